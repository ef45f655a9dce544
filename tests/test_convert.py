"""Conversion of the official checkpoints (tests/data/official: tiny models written by the paper's own JAX
and PyTorch code, with the official logits): every case reproduces the official logits; export and
re-import is the identity; bad input fails with one clear line and leaves nothing in --out."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("msgpack")

from ttt.checkpoint import load_model  # noqa: E402
from ttt.convert import ConvertError, convert, detect, export_official_pytorch, read_metadata  # noqa: E402

DATA = Path(__file__).parent / "data" / "official"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _logits(model, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)))[0]


@pytest.mark.parametrize("case", CASES)
def test_official_logits(case, tmp_path):
    src = DATA / case / "checkpoint"
    assert detect(src) == ("official-jax" if case.startswith("jax") else "official-pytorch")
    cfg, _ = convert(src, tmp_path / "run")
    assert cfg.mixer == ("ttt_mlp" if "_mlp_" in case else "ttt_linear")
    assert cfg.backbone == case.rsplit("_", 1)[1]
    model, _ = load_model(tmp_path / "run")
    for suffix in ("", "_len50"):
        if not (DATA / case / f"input_ids{suffix}.npy").exists():
            continue
        want = torch.from_numpy(np.load(DATA / case / f"logits{suffix}.npy"))
        got = _logits(model, np.load(DATA / case / f"input_ids{suffix}.npy"))
        assert got.shape == want.shape
        assert _rel_err(got, want) <= 1e-4, (case, suffix, _rel_err(got, want))


def test_metadata_config_matches_fixture():
    """The restricted unpickler reads the official ModelConfig as a plain dict (no JAX, no ml_collections)."""
    conf = read_metadata(DATA / "jax_mlp_mamba" / "checkpoint" / "metadata.pkl")
    assert conf["seq_modeling_block"] == "ttt_mlp" and conf["ttt_base_lr"] == 0.1 and conf["mini_batch_size"] == 16


def test_restricted_unpickler_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # a plain pickle.load would create the file

    p = tmp_path / "metadata.pkl"
    import pickle
    p.write_bytes(pickle.dumps({"model_config": {"a": 1}, "x": Evil()}))
    conf = read_metadata(p)  # open is outside the allowed builtins: it becomes an inert stub
    assert conf == {"a": 1} and not marker.exists()


def test_jax_without_metadata_infers_config(tmp_path):
    """Shapes alone give the config (lr etc. from the paper's defaults, which the linear fixture uses)."""
    src = tmp_path / "ck"
    src.mkdir()
    shutil.copy(DATA / "jax_linear_transformer" / "checkpoint" / "streaming_train_state", src)
    cfg, _ = convert(src, tmp_path / "run")
    model, _ = load_model(tmp_path / "run")
    got = _logits(model, np.load(DATA / "jax_linear_transformer" / "input_ids.npy"))
    assert _rel_err(got, torch.from_numpy(np.load(DATA / "jax_linear_transformer" / "logits.npy"))) <= 1e-4


@pytest.mark.parametrize("case", ["pt_linear_mamba", "pt_mlp_transformer"])
def test_export_roundtrip(case, tmp_path):
    """ours -> official PyTorch layout: the fixture's names/shapes/config, and converting back is exact."""
    convert(DATA / case / "checkpoint", tmp_path / "run")
    conf = export_official_pytorch(tmp_path / "run", tmp_path / "official")
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "official" / "model.safetensors"))
    reference = load_file(str(DATA / case / "checkpoint" / "model.safetensors"))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference.items()}
    for k in reference:
        assert torch.equal(exported[k], reference[k]), k
    official_conf = json.loads((DATA / case / "checkpoint" / "config.json").read_text())
    for k in ("ttt_layer_type", "pre_conv", "share_qk", "use_gate", "ttt_base_lr", "mini_batch_size", "hidden_size",
              "num_attention_heads", "intermediate_size", "conv_kernel", "rope_theta", "vocab_size"):
        assert conf[k] == official_conf[k], k
    convert(tmp_path / "official", tmp_path / "back")
    a, _ = load_model(tmp_path / "run")
    b, _ = load_model(tmp_path / "back")
    ids = np.load(DATA / case / "input_ids.npy")
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_trained_model_exports_and_reloads(tmp_path):
    """A model of ours (random init, not from a fixture) exports and reloads with identical logits."""
    from safetensors.torch import save_file

    from ttt.config import get_config
    from ttt.model import TTTLM

    torch.manual_seed(0)
    cfg = get_config("debug", mixer="ttt_mlp", backbone="mamba", vocab_size=96, tie_embeddings=False)
    model = TTTLM(cfg).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "vocab_size": 96}))
    export_official_pytorch(run, tmp_path / "official")
    convert(tmp_path / "official", tmp_path / "back")
    back, cfg2 = load_model(tmp_path / "back")
    ids = np.random.default_rng(0).integers(0, 96, (2, 37))
    assert torch.equal(_logits(model, ids), _logits(back, ids))
    assert cfg2.tie_embeddings is False and cfg2.base_lr == pytest.approx(0.1)


def test_unsupported_combination_refused(tmp_path):
    src = tmp_path / "pt"
    shutil.copytree(DATA / "pt_linear_mamba" / "checkpoint", src)
    conf = json.loads((src / "config.json").read_text())
    conf["use_gate"] = False
    (src / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConvertError, match="use_gate=False"):
        convert(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def test_cli_convert_bad_inputs(tmp_path, capsys):
    from ttt.cli import main

    def _cli(*args):
        code = main(["-q", *args])
        out, err = capsys.readouterr()
        return _Result(code, out, err)

    # truncated JAX checkpoint
    src = tmp_path / "trunc"
    src.mkdir()
    data = (DATA / "jax_linear_mamba" / "checkpoint" / "streaming_train_state").read_bytes()
    (src / "streaming_train_state").write_bytes(data[: len(data) // 2])
    r = _cli("convert", str(src), "--out", str(tmp_path / "o1"))
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".tmp-*"))
    # unknown format
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.xyz").write_bytes(b"hello")
    r = _cli("convert", str(tmp_path / "junk"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "SRC" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # a foreign transformers model
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    r = _cli("convert", str(tmp_path / "llama"), "--out", str(tmp_path / "o3"))
    assert r.returncode == 2 and "'llama'" in r.stderr, r.stderr
    # a tokenizer whose vocabulary does not fit (vocab 128 model, 300-token tokenizer)
    from ttt.tokenizer import Tokenizer

    tok = Tokenizer.train(["some text to learn merges from " * 20], vocab_size=300)
    tok.save(tmp_path / "tok.json")
    r = _cli("convert", str(DATA / "pt_linear_mamba" / "checkpoint"), "--out", str(tmp_path / "o4"),
             "--tokenizer", str(tmp_path / "tok.json"))
    assert r.returncode == 2 and "--tokenizer" in r.stderr and "vocabulary" in r.stderr, r.stderr
    assert not (tmp_path / "o4").exists()
    # success writes the run dir, and eval-facing loaders accept it
    r = _cli("convert", str(DATA / "jax_mlp_transformer" / "checkpoint"), "--out", str(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def _word_tokenizer(path, n_words: int = 126):
    """A 128-token word-level tokenizer.json with Llama-2's EOS name, the size of the fixtures' vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_converted_model_runs_in_eval_generate_and_finetune(tmp_path, capsys):
    """A converted official model with a tokenizer: `ttt generate` and `ttt eval` run on it, and
    `ttt train --init-from` fine-tunes it (weights from the run; the result stays next to them at a tiny lr)."""
    from ttt.cli import main

    _word_tokenizer(tmp_path / "tok.json")
    run = tmp_path / "run"
    assert main(["-q", "convert", str(DATA / "pt_linear_mamba" / "checkpoint"), "--out", str(run),
                 "--tokenizer", str(tmp_path / "tok.json")]) == 0
    capsys.readouterr()
    assert main(["-q", "generate", str(run), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2 w3")
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(" ".join(f"w{j}" for j in rng.integers(0, 126, 300)))
    assert main(["-q", "data", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--val-docs", "2"]) == 0
    assert main(["-q", "eval", str(run), "--data", str(tmp_path / "data"), "--seq-len", "64", "--n-seqs", "2",
                 "--chunk-len", "16", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["models"][0]["nll"] > 0
    assert main(["-q", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ft"),
                 "--init-from", str(run),
                 "--seq-len", "32", "--micro-batch", "2", "--tokens-per-step", "64", "--steps", "1", "--lr", "1e-7",
                 "--min-lr", "0", "--eval-every", "0", "--no-progress", "--device", "cpu"]) == 0
    src, _ = load_model(run)
    ft, cfg = load_model(tmp_path / "ft")
    assert cfg.backbone == "mamba" and cfg.d_model == 64
    for (name, a), b in zip(src.state_dict().items(), ft.state_dict().values()):
        assert (a - b).abs().max() < 1e-5, name
    assert any(not torch.equal(a, b) for a, b in zip(src.state_dict().values(), ft.state_dict().values()))
    # the model trained here exports to the official layout and reloads with identical logits
    assert main(["-q", "export", str(tmp_path / "ft"), "--out", str(tmp_path / "ft_official")]) == 0
    assert (tmp_path / "ft_official" / "tokenizer.json").is_file()
    assert main(["-q", "convert", str(tmp_path / "ft_official"), "--out", str(tmp_path / "ft_back")]) == 0
    back, _ = load_model(tmp_path / "ft_back")
    ids = np.random.default_rng(1).integers(0, 128, (2, 40))
    assert torch.equal(_logits(ft, ids), _logits(back, ids))


def test_streaming_params_file_and_config_override(tmp_path):
    """A `streaming_params` file (params only, keys from ('model', ...)) converts too; --config overrides."""
    import msgpack

    case = DATA / "jax_mlp_mamba"
    src = tmp_path / "ck"
    src.mkdir()
    with open(case / "checkpoint" / "streaming_train_state", "rb") as fh, open(src / "streaming_params", "wb") as out:
        for key, payload in msgpack.Unpacker(fh, max_buffer_size=0, raw=False):
            if key[:2] == ["params", "params"]:
                out.write(msgpack.packb([key[2:], payload], use_bin_type=True))
    shutil.copy(case / "checkpoint" / "metadata.pkl", src)
    convert(src, tmp_path / "run")
    model, _ = load_model(tmp_path / "run")
    want = torch.from_numpy(np.load(case / "logits.npy"))
    assert _rel_err(_logits(model, np.load(case / "input_ids.npy")), want) <= 1e-4
    (tmp_path / "over.json").write_text(json.dumps({"ttt_base_lr": 0.5}))
    cfg, _ = convert(src, tmp_path / "run2", config=tmp_path / "over.json")
    assert cfg.base_lr == 0.5
    model2, _ = load_model(tmp_path / "run2")
    assert _rel_err(_logits(model2, np.load(case / "input_ids.npy")), want) > 1e-3  # the override took effect


def test_pytorch_model_bin(tmp_path):
    """pytorch_model.bin (a pickle) is read with torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    case = DATA / "pt_mlp_mamba"
    src = tmp_path / "pt"
    src.mkdir()
    shutil.copy(case / "checkpoint" / "config.json", src)
    torch.save(load_file(str(case / "checkpoint" / "model.safetensors")), src / "pytorch_model.bin")
    convert(src, tmp_path / "run")
    model, _ = load_model(tmp_path / "run")
    want = torch.from_numpy(np.load(case / "logits.npy"))
    assert _rel_err(_logits(model, np.load(case / "input_ids.npy")), want) <= 1e-4
    # a pickle that is not plain tensors is refused, not executed
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ConvertError, match="weights_only=True"):
        convert(src, tmp_path / "run3")


@pytest.mark.parametrize("command", ["convert", "export", "lm-eval"])
def test_help_lists_every_option(command, capsys):
    from ttt.cli import build_parser, main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out, f"{command} --help lacks {flag}"


def test_pytorch_config_defaults(tmp_path):
    """Fields absent from an official config.json take the official TTTConfig defaults (save_pretrained may
    leave out fields equal to them): the Transformer fixture without its default-valued fields converts the same."""
    src = tmp_path / "pt"
    shutil.copytree(DATA / "pt_linear_transformer" / "checkpoint", src)
    conf = json.loads((src / "config.json").read_text())
    for k in ("pre_conv", "share_qk", "use_gate", "ttt_base_lr", "conv_kernel", "mini_batch_size", "rope_theta"):
        conf.pop(k)
    (src / "config.json").write_text(json.dumps(conf))
    cfg, _ = convert(src, tmp_path / "run")
    assert cfg.backbone == "transformer" and cfg.base_lr == 1.0 and cfg.mini_batch == 16
    model, _ = load_model(tmp_path / "run")
    want = torch.from_numpy(np.load(DATA / "pt_linear_transformer" / "logits.npy"))
    assert _rel_err(_logits(model, np.load(DATA / "pt_linear_transformer" / "input_ids.npy")), want) <= 1e-4


def test_jax_untied_head(tmp_path):
    """tie_word_embeddings=False: the head comes from ('params', 'params', 'lm_head', 'kernel') [C, V]. Here it
    holds the embedding's transpose, so the official (tied) logits must come out."""
    import msgpack

    case = DATA / "jax_linear_transformer"
    src = tmp_path / "ck"
    src.mkdir()
    records = list(msgpack.Unpacker(open(case / "checkpoint" / "streaming_train_state", "rb"), raw=False))
    emb = next(p for k, p in records if k[-2:] == ["wte", "embedding"])
    shape, dtype, raw = msgpack.unpackb(msgpack.unpackb(emb, raw=False).data, raw=False)
    kernel = np.frombuffer(raw, np.uint16).reshape(shape).T.copy()  # bf16 bits, [V, C] -> [C, V]
    head = msgpack.packb(msgpack.ExtType(1, msgpack.packb([list(kernel.shape), dtype, kernel.tobytes()])))
    with open(src / "streaming_train_state", "wb") as out:
        for k, p in records + [(["params", "params", "lm_head", "kernel"], head)]:
            out.write(msgpack.packb([k, p], use_bin_type=True))
    (tmp_path / "untied.json").write_text(json.dumps({"tie_word_embeddings": False}))
    shutil.copy(case / "checkpoint" / "metadata.pkl", src)
    cfg, _ = convert(src, tmp_path / "run", config=tmp_path / "untied.json")
    assert cfg.tie_embeddings is False
    model, _ = load_model(tmp_path / "run")
    want = torch.from_numpy(np.load(case / "logits.npy"))
    assert _rel_err(_logits(model, np.load(case / "input_ids.npy")), want) <= 1e-4


@pytest.mark.parametrize("case", ["jax_linear_mamba", "pt_mlp_transformer"])
def test_converted_weights_carry_the_tensor_hash(case, tmp_path, caplog, capsys):
    """`ttt convert` records the tensors' hash in the weights' header (streamed JAX and PyTorch paths alike), so
    loading them checks it and never warns 'written by an older version'; a flipped byte is then caught."""
    from safetensors import safe_open

    from ttt.checkpoint import file_tensors_sha256
    from ttt.cli import main

    assert main(["convert", str(DATA / case / "checkpoint"), "--out", str(tmp_path / "run")]) == 0
    weights = tmp_path / "run" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        assert fh.metadata()["sha256"] == file_tensors_sha256(weights)
    load_model(tmp_path / "run")
    assert "older version" not in caplog.text
    b = bytearray(weights.read_bytes())
    b[-3] ^= 0x01
    weights.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="sha256"):
        load_model(tmp_path / "run")
