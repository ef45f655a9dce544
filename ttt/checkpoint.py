"""Checkpoints on disk: safetensors for tensors, JSON for everything else (never pickle / torch.load).

A training run's out_dir:
    config.json                      the run: model config, train config, data fingerprint, vocab size
    latest.json                      {"step": 100, "checkpoint": "checkpoints/step_000100"}
    checkpoints/step_000100/
        model.safetensors            full, unsharded weights (a tied embedding/head is one tensor)
        optimizer.safetensors        every optimizer state tensor, named "<param name>/<state key>"
        config.json                  as above
        trainer.json                 step, schedule, data position, RNG states, optimizer param groups,
                                     and the sha256 of both safetensors files
        tokenizer.json               the tokenizer the run was trained with (so the checkpoint is portable)
A checkpoint is written into a temporary directory and renamed into place, and `latest.json` is
replaced after it, so a crash leaves either the old or the new checkpoint, never half of one.

Integrity does not depend on any side file: each safetensors file carries in its own header
(metadata "sha256") the hash of its tensors (names, dtypes, shapes and bytes), checked on every
load. model.safetensors also records "tokenizer_sha256" (the identity of the run's tokenizer, see
`Tokenizer.sha256`) and "data_fingerprint" (of the dataset it trained on), so a tokenizer that does
not belong to the weights can be refused (`check_tokenizer`). Anything unreadable, garbled (checksum),
or from another model/vocabulary raises a ValueError naming the file and what is wrong.

    model, cfg = load_model("runs/x")            # the latest checkpoint of a run, or a checkpoint dir
    model, cfg, ck = load_model("runs/x", with_checkpoint=True)   # ck.meta: the header's metadata
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import warnings
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import EXECUTION_FIELDS, ModelConfig, RunOptions
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE, OPTIM_FILE, CONFIG_FILE, TRAINER_FILE = ("model.safetensors", "optimizer.safetensors", "config.json",
                                                      "trainer.json")
TOKENIZER_FILE = "tokenizer.json"
LATEST = "latest.json"
CKPT_DIR = "checkpoints"
# model fields that do not change the function the weights compute: older configs hold these execution options
EXECUTION_ONLY = EXECUTION_FIELDS


# ----------------------------------------------------------------------------- small file helpers

def read_json(path: Path) -> dict:
    """A JSON object from `path`; ValueError naming the file when it is missing or not valid JSON."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (incomplete checkpoint or run directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: corrupt JSON (expected an object, got {type(obj).__name__})")
    return obj


def write_text(path: Path, text: str) -> None:
    """Write `text` under a temporary name, then rename it to `path` (no half-written file is ever seen)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (sorted by name): what the header records."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes of any dtype (bf16 included)
    return h.hexdigest()


class _FileTensors(Mapping):
    """The tensors of an open safetensors file as a read-only mapping, each read when asked for."""

    def __init__(self, fh):
        self._fh = fh

    def __getitem__(self, name):
        return self._fh.get_tensor(name)

    def __iter__(self):
        return iter(self._fh.keys())

    def __len__(self):
        return len(self._fh.keys())


def file_tensors_sha256(path) -> str:
    """`tensors_sha256` of the tensors in a safetensors file, one tensor in memory at a time."""
    with safe_open(str(path), framework="pt") as fh:
        return tensors_sha256(_FileTensors(fh))


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": str(FORMAT), "sha256": tensors_sha256(tensors),
                                            **{k: str(v) for k, v in (meta or {}).items() if v is not None}})


def _read_tensors(path: Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header metadata) of a safetensors file, its integrity checked: the tensor hash in its
    own header (always written) and, when given, the file hash `sha256` recorded in trainer.json."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (incomplete checkpoint)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from e
    if "sha256" in meta:
        if tensors_sha256(tensors) != meta["sha256"]:
            raise ValueError(f"{path}: corrupt (the sha256 of its tensors differs from the one recorded in its "
                             f"header): the file was damaged after it was written; use another checkpoint")
    elif sha256 is None:
        log.warning("%s: no integrity hash (written by an older version); loading it unchecked", path)
    if sha256 is not None and _sha256(path) != sha256:
        raise ValueError(f"{path}: corrupt (its sha256 differs from the one recorded in {TRAINER_FILE})")
    return tensors, meta


def check_tokenizer(tok: Tokenizer, meta: dict, vocab_size: int, *, what: str = "tokenizer",
                    where: str = "the checkpoint") -> str | None:
    """Why `tok` does not belong to a model of `vocab_size` whose checkpoint header is `meta`, or None.

    With a recorded "tokenizer_sha256" the tokenizer must be that one; without (an older checkpoint)
    its vocabulary must have exactly the model's size."""
    recorded = meta.get("tokenizer_sha256")
    if tok.vocab_size > vocab_size:
        return (f"{what} has a vocabulary of {tok.vocab_size}, larger than the model's {vocab_size}: it is not "
                f"the tokenizer this model was trained with")
    if recorded:
        if tok.sha256 != recorded:
            return (f"{what} is not the tokenizer this model was trained with (its sha256 {tok.sha256[:12]} differs "
                    f"from {recorded[:12]} recorded in {where})")
    elif tok.vocab_size != vocab_size:
        return (f"{what} has a vocabulary of {tok.vocab_size}, the model {vocab_size}: it is not the tokenizer "
                f"this model was trained with")
    return None


def encode_bytes(t: torch.Tensor) -> str:
    """A uint8 tensor (e.g. an RNG state) as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def decode_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


# ----------------------------------------------------------------------------- run identity

def compare_runs(saved: dict, current: dict) -> list[str]:
    """What differs between two run configs (`config.json` dicts), as 'key: saved X, now Y' lines.

    Compared: the model config (except the execution options older configs hold), the vocabulary
    size, the data fingerprint and the "run" part of the train config (whatever the trainer put there).
    """
    diffs = []

    def cmp(prefix, a, b, skip=()):
        a, b = a or {}, b or {}
        for k in sorted(set(a) | set(b)):
            if k not in skip and a.get(k) != b.get(k):
                diffs.append(f"{prefix}{k}: saved {a.get(k)!r}, now {b.get(k)!r}")

    if saved.get("vocab_size") != current.get("vocab_size"):
        diffs.append(f"vocab_size: saved {saved.get('vocab_size')!r}, now {current.get('vocab_size')!r}")
    cmp("model.", saved.get("model"), current.get("model"), EXECUTION_ONLY)
    cmp("data.", saved.get("data"), current.get("data"))
    cmp("train.", saved.get("run"), current.get("run"))
    return diffs


# ----------------------------------------------------------------------------- optimizer state

def flatten_optimizer_state(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state dict ({"state": {name: {key: value}}, "param_groups": [...]})
    into tensors named "<name>/<key>" and a JSON-able rest (param groups, non-tensor state values)."""
    tensors, extra = {}, {}
    for name, st in optim_state.get("state", {}).items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{key}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{name}/{key}"] = v
    return tensors, {"param_groups": optim_state.get("param_groups", []), "extra": extra}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, v in [*tensors.items(), *rest.get("extra", {}).items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = v
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in rest.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- save / find / read

def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(out_dir, step: int, model_state: dict[str, torch.Tensor], optim_state: dict, config: dict,
                    trainer: dict, keep: int = 0, tokenizer: Tokenizer | None = None) -> Path:
    """Write checkpoints/step_<step> atomically, point latest.json at it, and delete all but the
    newest `keep` checkpoints (0 keeps all). `tokenizer` (the run's) is saved beside the weights and
    its identity recorded in their header. Call on one rank only; returns the checkpoint dir."""
    out = Path(out_dir)
    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*-step_*"):  # left by a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        _write_tensors(model_state, tmp / MODEL_FILE, {"tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
                                                       "data_fingerprint": data.get("fingerprint")})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        optim_tensors, optim_rest = flatten_optimizer_state(optim_state)
        _write_tensors(optim_tensors, tmp / OPTIM_FILE)
        write_json(tmp / CONFIG_FILE, config)
        files = {name: _sha256(tmp / name) for name in (MODEL_FILE, OPTIM_FILE)}
        write_json(tmp / TRAINER_FILE, {"format": FORMAT, **trainer, "step": step, "optimizer": optim_rest,
                                        "sha256": files})
        if final.exists():  # re-saving a step: swap the old one out, then delete it
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(out / LATEST, {"step": step, "checkpoint": f"{CKPT_DIR}/{final.name}"})
    if keep > 0:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for p in done[:-keep]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint dir that out_dir/latest.json points at, or None when there is none."""
    out = Path(out_dir)
    if not (out / LATEST).exists():
        return None
    latest = read_json(out / LATEST)
    rel = latest.get("checkpoint")
    if not isinstance(rel, str):
        raise ValueError(f"{out / LATEST}: corrupt (no 'checkpoint' path)")
    path = out / rel
    if not path.is_dir():
        raise ValueError(f"{out / LATEST}: points at {path}, which does not exist")
    return path


def resolve(path) -> Path:
    """A checkpoint dir from a checkpoint dir or a run's out_dir (its latest checkpoint)."""
    p = Path(path)
    if (p / LATEST).exists():
        return latest_checkpoint(p)
    if any((p / f).exists() for f in (MODEL_FILE, OPTIM_FILE, TRAINER_FILE)):
        return p
    raise FileNotFoundError(f"path: {str(p)!r} is neither a checkpoint directory (no {MODEL_FILE}) nor a run's "
                            f"out_dir with a checkpoint (no {LATEST})")


@dataclass
class Checkpoint:
    path: Path
    config: dict
    trainer: dict
    model_state: dict[str, torch.Tensor]
    optim_state: dict | None
    meta: dict = dataclasses.field(default_factory=dict)  # model.safetensors header: tokenizer_sha256, ...


def read_checkpoint(path, *, optimizer: bool = True) -> Checkpoint:
    """Read and check every file of a checkpoint (or of a run's latest one)."""
    path = resolve(path)
    config = read_json(path / CONFIG_FILE)
    for key in ("model", "vocab_size"):
        if key not in config:
            raise ValueError(f"{path / CONFIG_FILE}: corrupt (no {key!r} entry)")
    trainer = read_json(path / TRAINER_FILE) if (optimizer or (path / TRAINER_FILE).exists()) else {}
    sums = trainer.get("sha256", {})
    model_state, meta = _read_tensors(path / MODEL_FILE, sums.get(MODEL_FILE))
    optim_state = None
    if optimizer:
        if "optimizer" not in trainer or "step" not in trainer:
            raise ValueError(f"{path / TRAINER_FILE}: corrupt (no 'step' or 'optimizer' entry)")
        optim_state = unflatten_optimizer_state(_read_tensors(path / OPTIM_FILE, sums.get(OPTIM_FILE))[0],
                                                trainer["optimizer"])
    return Checkpoint(path, config, trainer, model_state, optim_state, meta)


def model_config(ckpt: Checkpoint) -> ModelConfig:
    try:
        cfg = ModelConfig.from_dict(ckpt.config["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt.path / CONFIG_FILE}: corrupt model config ({e})") from e
    if cfg.vocab_size != ckpt.config["vocab_size"]:
        raise ValueError(f"{ckpt.path / CONFIG_FILE}: model vocab_size {cfg.vocab_size} != vocab_size "
                         f"{ckpt.config['vocab_size']}")
    return cfg


def check_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """ValueError naming `where` when `state` does not have exactly the model's names and shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [f"{k}: {got[k]} vs model {want[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
        raise ValueError(f"{where}: weights do not fit the model config (missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, shape mismatches {shapes[:5]})")


def load_model(path, device="cpu", *, with_checkpoint: bool = False, run: RunOptions | None = None,
               overrides: dict | None = None):
    """(model in eval mode on `device`, its ModelConfig) from a checkpoint dir or a run's out_dir;
    with_checkpoint=True adds the Checkpoint (path, config, header metadata; weights dropped).
    run: how the model runs (`RunOptions`; None: the defaults); checkpoints hold no execution options.
    overrides: deprecated, the RunOptions fields as a dict (e.g. {"ttt_backend": "dual"})."""
    from .model import TTTLM  # programs import the model, not the other way round

    if overrides:
        bad = sorted(set(overrides) - set(EXECUTION_ONLY))
        if bad:
            raise ValueError(f"overrides: only {EXECUTION_ONLY} may change on load, got {bad}")
        warnings.warn("load_model(overrides=...) is deprecated; pass run=RunOptions(...)", DeprecationWarning,
                      stacklevel=2)
        run = dataclasses.replace(run or RunOptions(), **overrides)
    ckpt = read_checkpoint(path, optimizer=False)
    cfg = model_config(ckpt)
    with torch.device(device):
        model = TTTLM(cfg, run)
    check_weights(model, ckpt.model_state, ckpt.path / MODEL_FILE)
    model.load_state_dict(ckpt.model_state)
    if with_checkpoint:
        return model.eval(), cfg, dataclasses.replace(ckpt, model_state={})
    return model.eval(), cfg
