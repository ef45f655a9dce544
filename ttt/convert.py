"""Conversion between the paper's official checkpoints and our run directories (docs/convert.md).

Read (format auto-detected by `detect`):
  "official-jax":     an EasyLM/JAX streaming checkpoint of ttt-lm-jax (`streaming_train_state` or
                      `streaming_params`, optional `metadata.pkl`): a concatenation of msgpack records
                      [key path, flax array bytes], read record by record without JAX or flax.
  "official-pytorch": a transformers folder of ttt-lm-pytorch (`config.json` + `model.safetensors` or
                      `pytorch_model.bin`, the latter read only with torch.load(weights_only=True)).
Write: an ordinary run directory of ours (`model.safetensors`, `config.json`, optional `tokenizer.json`),
which `ttt.checkpoint.load_model`, `ttt eval`, `ttt generate` and `ttt train --init-from` load; and the
reverse, `export_official_pytorch`, to the official PyTorch layout.

Every official weight goes through one table, official PyTorch name <-> our name plus a reshape; JAX keys
are first mapped to the official PyTorch names (flax kernels are [in, out], so they are transposed).
Every official config field is either mapped, checked against the one value we implement, or known to
change nothing in the function the weights compute (execution/training-only); anything else is refused
with a ConvertError naming the field and value.

    cfg, meta = convert("ttt-linear-1.3b-books-32k/", "runs/ttt13b", tokenizer="llama2/tokenizer.json")
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import logging
import shutil
import struct
from pathlib import Path

import torch

from .config import ModelConfig

log = logging.getLogger(__name__)

FORMATS = ("official-jax", "official-pytorch")
JAX_STATE_FILES = ("streaming_train_state", "streaming_params")


class ConvertError(ValueError):
    """Bad input to a conversion: the message is one line naming the file/field and what was expected."""


# ----------------------------------------------------------------------------- config mapping

# official fields that do not change the function the weights compute (execution, training-only, HF
# bookkeeping); they are recorded in config.json's "source" entry and otherwise ignored
_IGNORED = {
    # ttt-lm-jax ModelConfig
    "remat_block", "remat_attention", "remat_mlp", "remat_conv", "remat_mini_batch_group_size", "scan_attention",
    "scan_mlp", "scan_query_chunk_size", "scan_key_chunk_size", "scan_mlp_chunk_size", "fcm_min_ratio",
    "fcm_max_ratio", "embd_pdrop", "resid_pdrop", "attn_pdrop", "ttt_base_lr_init", "ttt_base_lr_warmup",
    "output_ttt_stats", "max_sequence_length",
    # ttt-lm-pytorch TTTConfig
    "scan_checkpoint_group_size", "pretraining_tp", "use_cache", "max_position_embeddings",
    # transformers PretrainedConfig bookkeeping
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "_name_or_path", "auto_map", "add_cross_attention", "bad_words_ids",
    "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label",
    "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "prefix", "problem_type", "pruned_heads", "remove_invalid_values",
    "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k",
    "top_p", "torchscript", "typical_p", "use_bfloat16",
}


# the official TTTConfig's defaults: transformers' save_pretrained may leave out fields equal to them
PT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
               "num_attention_heads": 32, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "rope_theta": 10000.0, "use_gate": False, "share_qk": False,
               "ttt_layer_type": "linear", "ttt_base_lr": 1.0, "mini_batch_size": 16, "pre_conv": False,
               "conv_kernel": 4}


def _get(conf: dict, key: str, default=None, required: bool = True):
    if key in conf:
        return conf[key]
    if required and default is None:
        raise ConvertError(f"config: missing the official field {key!r}")
    return default


def _num(conf, key, default=None):
    v = _get(conf, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConvertError(f"config: {key}={v!r} is not a number")
    return v


def official_to_config(conf: dict, fmt: str) -> ModelConfig:
    """Our ModelConfig for an official config dict (JAX `ModelConfig` or PyTorch `TTTConfig` fields).

    Refuses (ConvertError naming field=value) every combination our model does not implement."""
    if fmt == "official-jax":
        block = _get(conf, "seq_modeling_block")
        kinds = {"ttt_linear": ("ttt_linear", "mamba"), "ttt_linear_base": ("ttt_linear", "transformer"),
                 "ttt_mlp": ("ttt_mlp", "mamba"), "ttt_mlp_base": ("ttt_mlp", "transformer")}
        if block not in kinds:
            raise ConvertError(f"config: seq_modeling_block={block!r} is not implemented here "
                               f"(expected one of {sorted(kinds)})")
        mixer, backbone = kinds[block]
        pre_conv = _get(conf, "pre_conv", False, required=False)
        if bool(pre_conv) != (backbone == "mamba"):
            raise ConvertError(f"config: pre_conv={pre_conv!r} with seq_modeling_block={block!r} is not implemented "
                               f"here (ours: pre_conv=True exactly for the Mamba-backbone blocks ttt_linear/ttt_mlp)")
        width = _num(conf, "conv_width", 4)
        seq = _num(conf, "max_sequence_length", 2048)
        b = _num(conf, "mini_batch_size", 16)
        if seq % b:
            raise ConvertError(f"config: max_sequence_length={seq} is not a multiple of mini_batch_size={b}")
    elif fmt == "official-pytorch":
        conf = {**PT_DEFAULTS, **conf}
        layer = _get(conf, "ttt_layer_type")
        if layer not in ("linear", "mlp"):
            raise ConvertError(f"config: ttt_layer_type={layer!r} is not implemented here (expected 'linear' or 'mlp')")
        mixer = "ttt_" + layer
        flags = {k: bool(conf[k]) for k in ("pre_conv", "share_qk", "use_gate")}
        if len(set(flags.values())) != 1:
            raise ConvertError(f"config: pre_conv={flags['pre_conv']}, share_qk={flags['share_qk']}, "
                               f"use_gate={flags['use_gate']} is not implemented here (ours: all True = Mamba "
                               f"backbone, or all False = Transformer backbone)")
        backbone = "mamba" if flags["pre_conv"] else "transformer"
        width = _num(conf, "conv_kernel")
        act = conf["hidden_act"]
        if act != "silu":
            raise ConvertError(f"config: hidden_act={act!r} is not implemented here (the SwiGLU FFN uses 'silu')")
    else:
        raise ConvertError(f"format: expected one of {FORMATS}, got {fmt!r}")
    known = {"seq_modeling_block", "pre_conv", "conv_width", "mini_batch_size", "ttt_layer_type", "share_qk",
             "use_gate", "conv_kernel", "hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "vocab_size", "ttt_base_lr", "rope_theta", "rms_norm_eps",
             "tie_word_embeddings", "initializer_range"} | _IGNORED
    unknown = sorted(k for k in conf if k not in known)
    if unknown:  # e.g. a re-publication's own fields: say so, never silently
        log.warning("convert: ignoring config fields %s (unknown to the official code)", unknown)
    d, h = int(_num(conf, "hidden_size")), int(_num(conf, "num_attention_heads"))
    if d % h or (d // h) % 2:
        raise ConvertError(f"config: hidden_size={d} with num_attention_heads={h} does not give an even head dim")
    try:
        return ModelConfig(
            vocab_size=int(_num(conf, "vocab_size")), d_model=d, n_layers=int(_num(conf, "num_hidden_layers")),
            n_heads=h, ffn_hidden=int(_num(conf, "intermediate_size")), mixer=mixer, backbone=backbone,
            mini_batch=int(_num(conf, "mini_batch_size", 16)),
            base_lr=float(_num(conf, "ttt_base_lr", 0.1 if mixer == "ttt_mlp" else 1.0)),
            conv_width=int(width), rope_base=float(_num(conf, "rope_theta", 10000.0)),
            norm_eps=float(_num(conf, "rms_norm_eps", 1e-6)),
            tie_embeddings=bool(_get(conf, "tie_word_embeddings", True, required=False)),
            init_std=float(_num(conf, "initializer_range", 0.02)))
    except ValueError as e:
        raise ConvertError(f"config: {e}") from None


def config_to_official_pytorch(cfg: ModelConfig, max_position_embeddings: int = 2048) -> dict:
    """The official `TTTConfig` dict (config.json of a transformers folder) for our ModelConfig."""
    if cfg.mixer not in ("ttt_linear", "ttt_mlp"):
        raise ConvertError(f"mixer={cfg.mixer!r}: the official PyTorch code has TTT layers only "
                           f"(ttt_linear, ttt_mlp)")
    if not cfg.ffn_hidden:
        raise ConvertError("ffn_hidden=0: the official PyTorch code always has the SwiGLU FFN")
    m = cfg.backbone == "mamba"
    return {
        "architectures": ["TTTForCausalLM"], "model_type": "ttt", "ttt_layer_type": cfg.mixer[4:],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "use_cache": False, "pretraining_tp": 1, "rope_theta": cfg.rope_base,
        "mini_batch_size": cfg.mini_batch, "ttt_base_lr": cfg.base_lr if cfg.base_lr is not None else
        (0.1 if cfg.mixer == "ttt_mlp" else 1.0), "pre_conv": m, "share_qk": m, "use_gate": m,
        "conv_kernel": cfg.conv_width, "scan_checkpoint_group_size": 0, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- weight name mapping

def _official_to_ours_name(name: str, backbone: str) -> tuple[str, str] | None:
    """(our name, reshape kind) for an official PyTorch parameter name; None when it is not one.

    Reshape kinds: "same", "squeeze1" ([H,1,n] -> [H,n], [H,1] -> [H])."""
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "head.weight"}
    if name in top:
        return top[name], "same"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    i, rest = m.groups()
    block = {"seq_norm.weight": "mixer_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn.gate.weight", "mlp.up_proj.weight": "ffn.up.weight",
             "mlp.down_proj.weight": "ffn.down.weight", "conv.norm.weight": "conv_norm.weight",
             "conv.conv.weight": "conv.weight", "conv.conv.bias": "conv.bias"}
    if rest in block:
        return f"blocks.{i}.{block[rest]}", "same"
    if not rest.startswith("seq_modeling_block."):
        return None
    s = rest[len("seq_modeling_block."):]
    mixer = {"q_proj.weight": "qk_proj.weight" if backbone == "mamba" else "q_proj.weight",
             "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight", "o_proj.weight": "o_proj.weight",
             "g_proj.weight": "gate_proj.weight", "conv_q.weight": "conv_q.weight", "conv_q.bias": "conv_q.bias",
             "conv_k.weight": "conv_k.weight", "conv_k.bias": "conv_k.bias", "learnable_token_idx": "delta",
             "ttt_norm_weight": "ln_weight", "ttt_norm_bias": "ln_bias", "post_norm.weight": "post_norm.weight",
             "post_norm.bias": "post_norm.bias", "W1": "W1", "W2": "W2"}
    squeeze = {"learnable_ttt_lr_weight": "lr_weight", "learnable_ttt_lr_bias": "lr_bias", "b1": "b1", "b2": "b2"}
    if s in mixer:
        return f"blocks.{i}.mixer.{mixer[s]}", "same"
    if s in squeeze:
        return f"blocks.{i}.mixer.{squeeze[s]}", "squeeze1"
    return None


def official_to_ours(name: str, t: torch.Tensor, backbone: str) -> tuple[str, torch.Tensor]:
    m = _official_to_ours_name(name, backbone)
    if m is None:
        raise ConvertError(f"weights: {name!r} is not a parameter of the official TTT model")
    ours, kind = m
    if kind == "squeeze1":
        if t.dim() < 2 or t.shape[1] != 1:
            raise ConvertError(f"weights: {name!r} has shape {tuple(t.shape)}, expected [H, 1, ...]")
        t = t.squeeze(1)
    return ours, t


def ours_to_official(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """{our name: (official PyTorch name, reshape kind)} for every weight of a model with config `cfg`."""
    from .model import TTTLM

    with torch.device("meta"):
        names = list(TTTLM(cfg).state_dict())
    inv = {}
    for i in range(cfg.n_layers):
        for rest in ("seq_norm.weight", "ffn_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight", "conv.norm.weight", "conv.conv.weight", "conv.conv.bias"):
            o = f"model.layers.{i}.{rest}"
            inv[_official_to_ours_name(o, cfg.backbone)[0]] = (o, "same")
        for s in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "g_proj.weight",
                  "conv_q.weight", "conv_q.bias", "conv_k.weight", "conv_k.bias", "learnable_token_idx",
                  "ttt_norm_weight", "ttt_norm_bias", "post_norm.weight", "post_norm.bias", "W1", "W2",
                  "learnable_ttt_lr_weight", "learnable_ttt_lr_bias", "b1", "b2"):
            o = f"model.layers.{i}.seq_modeling_block.{s}"
            ours, kind = _official_to_ours_name(o, cfg.backbone)
            if not (cfg.backbone == "mamba" and s == "k_proj.weight"):
                inv[ours] = (o, kind)
    for o in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        inv[_official_to_ours_name(o, cfg.backbone)[0]] = (o, "same")
    missing = [n for n in names if n not in inv]
    if missing:
        raise ConvertError(f"export: no official name for {missing[:5]}")
    return {n: inv[n] for n in names}


# JAX key (below ('model',)) -> official PyTorch name and the conversion from the flax layout
def _jax_to_official(path: tuple) -> tuple[str, str] | None:
    """(official PyTorch name, transform) for a flax parameter path below ('model',) or ('lm_head',)."""
    p = "/".join(path)
    if p == "lm_head/kernel":
        return "lm_head.weight", "T"
    if p == "model/wte/embedding":
        return "model.embed_tokens.weight", "same"
    if p == "model/ln_f/kernel":
        return "model.norm.weight", "same"
    m = re.fullmatch(r"model/h/(\d+)/(.+)", p)
    if not m:
        return None
    i, rest = m.groups()
    L = f"model.layers.{i}."
    table = {"seq_norm/kernel": ("seq_norm.weight", "same"), "ffn_norm/kernel": ("ffn_norm.weight", "same"),
             "feed_forward/w1/kernel": ("mlp.gate_proj.weight", "T"),
             "feed_forward/w3/kernel": ("mlp.up_proj.weight", "T"),
             "feed_forward/w2/kernel": ("mlp.down_proj.weight", "T"),
             "conv/conv_norm/kernel": ("conv.norm.weight", "same"), "conv/conv1/kernel": ("conv.conv.weight", "conv"),
             "conv/conv1/bias": ("conv.conv.bias", "same")}
    if rest in table:
        n, tr = table[rest]
        return L + n, tr
    b = "seq_modeling_block/"
    if not rest.startswith(b):
        return None
    s = rest[len(b):]
    blk = {"wq/kernel": ("q_proj.weight", "T"), "wk/kernel": ("k_proj.weight", "T"),
           "wv/kernel": ("v_proj.weight", "T"), "wo/kernel": ("o_proj.weight", "T"),
           "wg/kernel": ("g_proj.weight", "T"), "conv_q/kernel": ("conv_q.weight", "conv"),
           "conv_q/bias": ("conv_q.bias", "same"), "conv_k/kernel": ("conv_k.weight", "conv"),
           "conv_k/bias": ("conv_k.bias", "same"), "learnable_token_idx": ("learnable_token_idx", "same"),
           "learnable_ttt_lr/kernel": ("learnable_ttt_lr_weight", "lr"),
           "learnable_ttt_lr/bias": ("learnable_ttt_lr_bias", "same"),
           "ttt_norm/scale": ("ttt_norm_weight", "same"), "ttt_norm/bias": ("ttt_norm_bias", "same"),
           "post_norm/scale": ("post_norm.weight", "same"), "post_norm/bias": ("post_norm.bias", "same"),
           "ttt_dense_0": ("W1", "same"), "ttt_bias_0": ("b1", "same"), "ttt_dense_1": ("W2", "same"),
           "ttt_bias_1": ("b2", "same")}
    if s in blk:
        n, tr = blk[s]
        return L + "seq_modeling_block." + n, tr
    return None


def _jax_transform(t: torch.Tensor, tr: str) -> torch.Tensor:
    if tr == "T":  # flax Dense kernel [in, out] -> torch Linear weight [out, in]
        return t.t()
    if tr == "conv":  # flax depthwise Conv kernel [K, 1, C] -> torch Conv1d weight [C, 1, K]
        return t.permute(2, 1, 0)
    if tr == "lr":  # [H, C, 1] -> [H, 1, C]
        return t.permute(0, 2, 1)
    return t


# ----------------------------------------------------------------------------- JAX streaming reader

_FLAX_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
                "float64": torch.float64, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
                "int8": torch.int8, "bool": torch.bool}


def _msgpack():
    try:
        import msgpack
    except ImportError:
        raise ConvertError("reading JAX checkpoints needs msgpack: pip install 'ttt-lm[convert]'") from None
    return msgpack


def _decode_leaf(payload, where: str) -> torch.Tensor:
    """flax.serialization.to_bytes(array) -> a torch tensor (the bytes stay in their stored dtype)."""
    msgpack = _msgpack()
    if not isinstance(payload, (bytes, bytearray)):
        raise ConvertError(f"{where}: a record's payload is {type(payload).__name__}, expected flax array bytes")
    try:
        ext = msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise ConvertError(f"{where}: corrupt array record ({e})") from None
    if isinstance(ext, dict):
        raise ConvertError(f"{where}: chunked arrays (leaves over 1 GiB) are not supported")
    if not isinstance(ext, msgpack.ExtType) or ext.code not in (1, 3):
        raise ConvertError(f"{where}: not a flax ndarray record")
    try:
        shape, dtype, raw = msgpack.unpackb(ext.data, raw=False)
    except Exception as e:
        raise ConvertError(f"{where}: corrupt array record ({e})") from None
    if dtype not in _FLAX_DTYPES:
        raise ConvertError(f"{where}: array dtype {dtype!r} is not supported")
    td = _FLAX_DTYPES[dtype]
    n = 1
    for s in shape:
        n *= s
    if len(raw) != n * torch.empty((), dtype=td).element_size():
        raise ConvertError(f"{where}: array of shape {shape} {dtype} holds {len(raw)} bytes (truncated?)")
    if n == 0:
        return torch.empty(shape, dtype=td)
    return torch.frombuffer(bytearray(raw), dtype=td).reshape(shape)


def iter_jax_records(path: Path):
    """(key tuple, payload bytes) for every record of a streaming checkpoint file, one at a time."""
    msgpack = _msgpack()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        unpacker = msgpack.Unpacker(fh, max_buffer_size=0, raw=False)
        n = 0
        while True:
            try:
                rec = unpacker.unpack()
            except msgpack.OutOfData:
                if unpacker.tell() != size:
                    raise ConvertError(f"{path}: truncated (a record is cut off at byte {unpacker.tell()} of "
                                       f"{size})") from None
                break
            except Exception as e:
                raise ConvertError(f"{path}: not an EasyLM streaming checkpoint ({type(e).__name__}: {e})") from None
            if (not isinstance(rec, (list, tuple)) or len(rec) != 2 or not isinstance(rec[0], (list, tuple))
                    or not all(isinstance(k, str) for k in rec[0])):
                raise ConvertError(f"{path}: not an EasyLM streaming checkpoint (record {n} is not [key path, "
                                   f"array])")
            n += 1
            yield tuple(rec[0]), rec[1]
        if n == 0:
            raise ConvertError(f"{path}: empty checkpoint file")


def _jax_param_path(key: tuple, streaming_params: bool) -> tuple | None:
    """The flax param path ('model', ...) of a record key, or None for non-parameter records."""
    if streaming_params:
        return key if key and key[0] in ("model", "lm_head") else None
    if len(key) > 2 and key[:2] == ("params", "params"):
        return key[2:]
    return None


class _Stub:
    """Stands in for every non-builtin class of metadata.pkl: it keeps its state, runs no code."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_SAFE_BUILTINS = {"int", "float", "str", "bytes", "bool", "dict", "list", "tuple", "set", "frozenset", "complex"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers and scalars; every other global becomes an inert `_Stub` subclass."""

    def find_class(self, module, name):
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        return type(name, (_Stub,), {"__module__": "ttt.convert.stub." + module})


def read_metadata(path: Path) -> dict:
    """metadata.pkl's 'model_config' entry (a plain dict), read without running any pickled code."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise ConvertError(f"{path}: unreadable metadata pickle ({type(e).__name__}: {e})") from None
    conf = obj.get("model_config") if isinstance(obj, dict) else None
    if not isinstance(conf, dict):
        raise ConvertError(f"{path}: no 'model_config' dict (not an EasyLM metadata.pkl)")
    return conf


def infer_jax_config(shapes: dict[str, tuple]) -> dict:
    """An official JAX config from the parameter shapes (official PyTorch names); lr, RoPE and eps get
    the paper's defaults (printed)."""
    try:
        V, C = shapes["model.embed_tokens.weight"]
        layers = sorted({int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.")})
        blk = "model.layers.0.seq_modeling_block."
        H = shapes[blk + "ttt_norm_weight"][0]
        mlp = blk + "W2" in shapes
        mamba = blk + "g_proj.weight" in shapes
        conf = {"vocab_size": V, "hidden_size": C, "num_hidden_layers": len(layers), "num_attention_heads": H,
                "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
                "mini_batch_size": shapes[blk + "learnable_token_idx"][0],
                "seq_modeling_block": ("ttt_mlp" if mlp else "ttt_linear") + ("" if mamba else "_base"),
                "pre_conv": "model.layers.0.conv.conv.weight" in shapes,
                "tie_word_embeddings": "lm_head.weight" not in shapes}
        if "model.layers.0.conv.conv.weight" in shapes:
            conf["conv_width"] = shapes["model.layers.0.conv.conv.weight"][2]
        elif blk + "conv_q.weight" in shapes:
            conf["conv_width"] = shapes[blk + "conv_q.weight"][2]
    except (KeyError, ValueError, IndexError) as e:
        raise ConvertError(f"checkpoint: cannot infer the model config from the weights (no {e}); pass --config")
    conf["max_sequence_length"] = conf["mini_batch_size"]
    log.warning("convert: no metadata.pkl; config inferred from the shapes, with the paper's ttt_base_lr %s, "
                "rope_theta 10000, rms_norm_eps 1e-6 (pass --config to override)", 0.1 if mlp else 1.0)
    return conf


# ----------------------------------------------------------------------------- streaming safetensors writer

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


_HASH_SLOT = "0" * 64  # the header's "sha256" until the tensors are written and hashed


def write_safetensors_stream(path: Path, specs: list[tuple[str, torch.dtype, tuple]], tensors, metadata=None,
                             record_hash: bool = False):
    """Write a safetensors file tensor by tensor: `specs` (name, dtype, shape) fix the header first, then
    `tensors` yields (name, tensor) in the same order; only one tensor is in memory at a time.
    record_hash: the header's metadata gets the hash of the tensors (`ttt.checkpoint.tensors_sha256`, checked
    on every load), written into a slot reserved in the header once the file is complete."""
    header, off = {}, 0
    metadata = {**(metadata or {}), **({"sha256": _HASH_SLOT} if record_hash else {})}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, dtype, shape in specs:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for (name, dtype, shape), (tname, t) in zip(specs, tensors, strict=True):
            if tname != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"safetensors stream: expected {name} {dtype} {shape}, got {tname} {t.dtype} "
                                   f"{tuple(t.shape)}")
            fh.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if record_hash:
        from .checkpoint import file_tensors_sha256

        slot = f'"sha256":"{_HASH_SLOT}"'.encode()
        at = hb.index(slot) + len(slot) - 65  # the first hex digit of the slot
        digest = file_tensors_sha256(path).encode()
        with open(path, "r+b") as fh:
            fh.seek(8 + at)
            fh.write(digest)


# ----------------------------------------------------------------------------- detection and reading

def detect(src: Path) -> str:
    """'official-jax' or 'official-pytorch' for a source path; ConvertError for anything else."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"SRC: {str(src)!r} does not exist")
    if src.is_file():
        if src.name.startswith(JAX_STATE_FILES):
            return "official-jax"
        with open(src, "rb") as fh:
            first = fh.read(2)
        if first[:1] == b"\x92":  # a 2-element msgpack array: [key, payload]
            return "official-jax"
        raise ConvertError(f"SRC: {str(src)!r} is not a recognised checkpoint (expected an EasyLM "
                           f"streaming_train_state/streaming_params file or an official PyTorch folder)")
    if _jax_state_file(src) is not None:
        return "official-jax"
    if (src / "config.json").is_file():
        conf = _read_json(src / "config.json")
        if conf.get("model_type") == "ttt" or "ttt_layer_type" in conf:
            if not ((src / "model.safetensors").is_file() or (src / "pytorch_model.bin").is_file()):
                raise ConvertError(f"SRC: {str(src)!r} has an official config.json but no model.safetensors or "
                                   f"pytorch_model.bin")
            return "official-pytorch"
        if isinstance(conf.get("model"), dict) and "vocab_size" in conf:
            raise ConvertError(f"SRC: {str(src)!r} is already a run directory of ours (nothing to convert)")
        raise ConvertError(f"SRC: {str(src / 'config.json')!r} is not an official TTT config "
                           f"(model_type {conf.get('model_type')!r}, expected 'ttt')")
    raise ConvertError(f"SRC: {str(src)!r} holds no known checkpoint (expected streaming_train_state / "
                       f"streaming_params, or config.json + model.safetensors / pytorch_model.bin)")


def _jax_state_file(src: Path) -> Path | None:
    for name in JAX_STATE_FILES:
        if (src / name).is_file():
            return src / name
    return None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return obj


def _jax_plan(state_file: Path):
    """Pass 1 over a JAX file: [(official name, transform, out dtype, out shape)] in file order."""
    streaming_params = state_file.name.startswith("streaming_params")
    plan, seen = [], set()
    for key, payload in iter_jax_records(state_file):
        path = _jax_param_path(key, streaming_params)
        if path is None:
            continue
        m = _jax_to_official(path)
        where = f"{state_file}: record {key}"
        if m is None:
            raise ConvertError(f"{where} is not a parameter of an official TTT model (foreign checkpoint?)")
        t = _decode_leaf(payload, where)
        name, tr = m
        if name in seen:
            raise ConvertError(f"{where}: duplicate parameter")
        seen.add(name)
        out = _jax_transform(t, tr)
        plan.append((key, name, tr, out.dtype, tuple(out.shape)))
    if not plan:
        raise ConvertError(f"{state_file}: no model parameters in it (expected keys under ('params', 'params', "
                           f"'model') or ('model',))")
    return plan, streaming_params


def _pt_state(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(src / "model.safetensors"))
        except Exception as e:
            raise ConvertError(f"{src / 'model.safetensors'}: corrupt safetensors file ({e})") from None
    try:
        state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message advises weights_only=False, i.e. running whatever the pickle holds: keep only the reason
        reason = [line.strip() for line in str(e).splitlines() if line.strip() and not re.search(
            r"weights_only|torch\.load|file an issue|trusted source", line)]
        raise ConvertError(f"{src / 'pytorch_model.bin'}: not a file of plain tensors ({type(e).__name__}"
                           f"{': ' + reason[0] if reason else ''}); it is read only with torch.load(weights_only=True), "
                           f"which never runs code from the file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{src / 'pytorch_model.bin'}: expected a dict of tensors")
    return state


def _check_against_model(cfg: ModelConfig, shapes: dict[str, tuple], where: str) -> None:
    from .model import TTTLM

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in TTTLM(cfg).state_dict().items()}
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    bad = [f"{k}: {shapes[k]} vs {want[k]}" for k in sorted(set(want) & set(shapes)) if shapes[k] != want[k]]
    if missing or extra or bad:
        raise ConvertError(f"{where}: weights do not fit the config (missing {missing[:4]}, unexpected {extra[:4]}, "
                           f"shapes {bad[:4]})")


# ----------------------------------------------------------------------------- convert / export

def _tokenizer_vocab(path: Path) -> int:
    from tokenizers import Tokenizer as HFTokenizer

    if not Path(path).is_file():
        raise ConvertError(f"--tokenizer: {str(path)!r} is not a file (expected a tokenizer.json)")
    try:
        return HFTokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:
        raise ConvertError(f"--tokenizer: {str(path)!r} is not a valid tokenizer.json ({e})") from None


def _atomic_dir(out: Path):
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"--out: {str(out)!r} exists and is not empty; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked by _atomic_dir)
    os.replace(tmp, out)


def convert(src, out, *, tokenizer=None, config=None, fmt: str | None = None) -> tuple[ModelConfig, dict]:
    """Convert an official checkpoint at `src` into a run directory `out` (written to a temporary dir and
    renamed). `config`: a JSON file of official config fields that override the checkpoint's. Returns
    (our ModelConfig, the "source" record written to config.json)."""
    src = Path(src)
    fmt = fmt or detect(src)
    try:
        override = _read_json(Path(config)) if config else {}
    except ConvertError as e:
        raise ConvertError(f"--config: {e}") from None
    vocab_tok = _tokenizer_vocab(Path(tokenizer)) if tokenizer else None
    source = {"format": fmt, "path": str(src)}
    if fmt == "official-jax":
        state_file = src if src.is_file() else _jax_state_file(src)
        if state_file is None:
            raise ConvertError(f"SRC: no streaming_train_state or streaming_params in {str(src)!r}")
        plan, _ = _jax_plan(state_file)
        shapes_off = {name: shape for _, name, tr, dt, shape in plan}
        meta = state_file.parent / "metadata.pkl"
        if meta.is_file():
            conf = read_metadata(meta)
        elif override:
            conf = {}
        else:
            conf = infer_jax_config(shapes_off)
        conf = {**conf, **override}
        cfg = official_to_config(conf, fmt)
    else:
        conf = {**_read_json(src / "config.json"), **override}
        cfg = official_to_config(conf, fmt)
        state = _pt_state(src)
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # a tied copy, when the file stores one
        shapes_off = {k: tuple(v.shape) for k, v in state.items()}
    source["official_config"] = {k: v for k, v in conf.items() if isinstance(v, (int, float, str, bool, type(None)))}
    # our names and shapes, checked against the model before anything is written
    ours_shapes = {}
    for name, shape in shapes_off.items():
        ours, kind = _official_to_ours_name(name, cfg.backbone) or (None, None)
        if ours is None:
            raise ConvertError(f"{src}: {name!r} is not a parameter of the official TTT model (foreign checkpoint?)")
        if kind == "squeeze1":
            shape = (shape[0], *shape[2:]) if len(shape) >= 2 and shape[1] == 1 else shape + ("?",)
        ours_shapes[ours] = shape
    _check_against_model(cfg, ours_shapes, str(src))
    if vocab_tok is not None and vocab_tok > cfg.vocab_size:
        raise ConvertError(f"--tokenizer: its vocabulary ({vocab_tok}) is larger than the model's ({cfg.vocab_size}); "
                           f"it is not this model's tokenizer")
    out, tmp = _atomic_dir(Path(out))
    try:
        if fmt == "official-jax":
            specs = []
            for key, name, tr, dt, shape in plan:
                ours, kind = _official_to_ours_name(name, cfg.backbone)
                specs.append((ours, dt, ours_shapes[ours]))
            wanted = {key: (name, tr) for key, name, tr, _, _ in plan}

            def gen():  # pass 2: one tensor at a time
                for key, payload in iter_jax_records(state_file):
                    if key in wanted:
                        name, tr = wanted[key]
                        yield official_to_ours(name, _jax_transform(_decode_leaf(payload, str(key)), tr),
                                               cfg.backbone)
            write_safetensors_stream(tmp / "model.safetensors", specs, gen(), {"format": "ttt-convert"},
                                     record_hash=True)
        else:
            from safetensors.torch import save_file

            from .checkpoint import tensors_sha256
            ours_state = {k: v.contiguous() for k, v in (official_to_ours(k, v, cfg.backbone) for k, v in state.items())}
            save_file(ours_state, str(tmp / "model.safetensors"),
                      metadata={"format": "ttt-convert", "sha256": tensors_sha256(ours_state)})
        run = {"model_type": "ttt_lm", "model": cfg.to_dict(), "vocab_size": cfg.vocab_size, "source": source}
        (tmp / "config.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg, source


def export_official_pytorch(run_dir, out, *, max_position_embeddings: int = 2048) -> dict:
    """Write `out` as an official PyTorch transformers folder (config.json, generation_config.json,
    model.safetensors with the official names) from a run directory or checkpoint. Returns the config."""
    from safetensors.torch import save_file

    from .checkpoint import load_model, resolve

    ck = resolve(run_dir)
    model, cfg = load_model(ck)
    conf = config_to_official_pytorch(cfg, max_position_embeddings)
    names = ours_to_official(cfg)
    state = {}
    for ours, t in model.state_dict().items():
        name, kind = names[ours]
        t = t.detach().float()
        if kind == "squeeze1":
            t = t.unsqueeze(1)
        state[name] = t.contiguous()
    out, tmp = _atomic_dir(Path(out))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2),
                                                   encoding="utf-8")
        train = json.loads((ck / "config.json").read_text(encoding="utf-8")).get("train")
        data_tok = [Path(train["data_dir"]) / "tokenizer.json"] if isinstance(train, dict) and isinstance(
            train.get("data_dir"), str) else []
        for tok in (ck / "tokenizer.json", Path(run_dir) / "tokenizer.json", *data_tok):  # a run's: its data's
            if tok.is_file():
                shutil.copyfile(tok, tmp / "tokenizer.json")
                break
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return conf
