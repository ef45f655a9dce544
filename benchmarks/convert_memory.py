"""Peak memory of `ttt convert` on a full-size EasyLM/JAX streaming checkpoint (CPU only, no GPU needed).

Writes a synthetic `streaming_train_state` in the official record format (step, params, Adam mu and nu,
all bf16 like a released model's) for a preset size, converts it in a fresh process, and prints the
file size, the converted size, the seconds and the converter's peak RSS. The claim to check: peak RSS
stays near one tensor (the embedding) plus the Python/torch baseline, far below the params size.

    python benchmarks/convert_memory.py --size 1.3b --mixer ttt_linear --dir /tmp/convmem
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np


def _leaf(shape, rng) -> bytes:
    """flax.serialization.to_bytes of a bf16 array: ext 1 of [shape, 'bfloat16', bytes]."""
    n = int(np.prod(shape)) if shape else 1
    raw = (rng.standard_normal(min(n, 1 << 20), dtype=np.float32) * 0.02).view(np.uint32) >> 16
    raw = np.resize(raw.astype(np.uint16), n).tobytes()
    ext = msgpack.ExtType(1, msgpack.packb([list(shape), "bfloat16", raw], use_bin_type=True))
    return msgpack.packb(ext, use_bin_type=True)


def official_shapes(size: str, mixer: str) -> dict[tuple, tuple]:
    from ttt.config import get_config

    cfg = get_config(size, mixer=mixer, backbone="mamba")
    C, H, I, V, K, b = cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.vocab_size, cfg.conv_width, cfg.mini_batch  # noqa: E741
    d = C // H
    shapes = {("wte", "embedding"): (V, C), ("ln_f", "kernel"): (C,)}
    for i in range(cfg.n_layers):
        L = ("h", str(i))
        B = L + ("seq_modeling_block",)
        shapes.update({L + ("seq_norm", "kernel"): (C,), L + ("ffn_norm", "kernel"): (C,),
                       L + ("feed_forward", "w1", "kernel"): (C, I), L + ("feed_forward", "w3", "kernel"): (C, I),
                       L + ("feed_forward", "w2", "kernel"): (I, C), L + ("conv", "conv_norm", "kernel"): (C,),
                       L + ("conv", "conv1", "kernel"): (K, 1, C), L + ("conv", "conv1", "bias"): (C,),
                       B + ("wq", "kernel"): (C, C), B + ("wv", "kernel"): (C, C), B + ("wo", "kernel"): (C, C),
                       B + ("wg", "kernel"): (C, C), B + ("conv_q", "kernel"): (K, 1, C), B + ("conv_q", "bias"): (C,),
                       B + ("conv_k", "kernel"): (K, 1, C), B + ("conv_k", "bias"): (C,),
                       B + ("learnable_token_idx",): (b,), B + ("learnable_ttt_lr/kernel",): (H, C, 1),
                       B + ("learnable_ttt_lr/bias",): (H, 1), B + ("ttt_norm/scale",): (H, d),
                       B + ("ttt_norm/bias",): (H, d), B + ("post_norm", "scale"): (C,),
                       B + ("post_norm", "bias"): (C,)})
        if mixer == "ttt_linear":
            shapes.update({B + ("ttt_dense_0",): (H, d, d), B + ("ttt_bias_0",): (H, 1, d)})
        else:
            shapes.update({B + ("ttt_dense_0",): (H, d, 4 * d), B + ("ttt_bias_0",): (H, 1, 4 * d),
                           B + ("ttt_dense_1",): (H, 4 * d, d), B + ("ttt_bias_1",): (H, 1, d)})
    return shapes


def write_checkpoint(path: Path, size: str, mixer: str) -> None:
    rng = np.random.default_rng(0)
    shapes = official_shapes(size, mixer)
    step = msgpack.packb(msgpack.ExtType(1, msgpack.packb([[], "int32", b"\x01\x00\x00\x00"], use_bin_type=True)),
                         use_bin_type=True)
    with open(path, "wb") as fh:
        fh.write(msgpack.packb([["step"], step], use_bin_type=True))
        for prefix in (["params", "params", "model"], ["opt_state", "1", "0", "mu", "params", "model"],
                       ["opt_state", "1", "0", "nu", "params", "model"]):
            for key in sorted(shapes):
                fh.write(msgpack.packb([prefix + list(key), _leaf(shapes[key], rng)], use_bin_type=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.3b")
    ap.add_argument("--mixer", default="ttt_linear", choices=["ttt_linear", "ttt_mlp"])
    ap.add_argument("--dir", default="/tmp/convert_memory")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "src").mkdir(parents=True)
    t0 = time.time()
    write_checkpoint(root / "src" / "streaming_train_state", args.size, args.mixer)
    from ttt.config import get_config

    cfg = get_config(args.size, mixer=args.mixer, backbone="mamba")
    conf = {"seq_modeling_block": args.mixer, "pre_conv": True, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ffn_hidden,
            "vocab_size": cfg.vocab_size, "mini_batch_size": cfg.mini_batch, "conv_width": cfg.conv_width,
            "max_sequence_length": 2048, "ttt_base_lr": 1.0, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True}
    (root / "conf.json").write_text(json.dumps(conf))
    write_s = time.time() - t0
    code = ("import resource, sys, time; from ttt.convert import convert; t = time.time(); "
            f"convert({str(root / 'src')!r}, {str(root / 'run')!r}, config={str(root / 'conf.json')!r}); "
            "print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    base = ("import resource, torch, ttt.convert, msgpack; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    baseline_kb = int(subprocess.run([sys.executable, "-c", base], capture_output=True, text=True,
                                     check=True).stdout.split()[-1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    secs, peak_kb = float(out[-2]), int(out[-1])
    src_gb = (root / "src" / "streaming_train_state").stat().st_size / 1e9
    run_gb = (root / "run" / "model.safetensors").stat().st_size / 1e9
    emb_gb = cfg.vocab_size * cfg.d_model * 2 / 1e9
    print(json.dumps({"size": args.size, "mixer": args.mixer, "checkpoint_GB": round(src_gb, 3),
                      "converted_GB": round(run_gb, 3), "write_s": round(write_s, 1), "convert_s": round(secs, 1),
                      "peak_rss_GB": round(peak_kb / 1e6, 3), "import_baseline_rss_GB": round(baseline_kb / 1e6, 3),
                      "largest_tensor_GB": round(emb_gb, 3)}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
