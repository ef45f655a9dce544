"""Sampling from a TTTLM: prefill the prompt in one forward, then one-token decode steps carrying state.

    for ids in stream(model, [prompt_ids], max_new_tokens=100, top_p=0.9, seed=0):   # ids: [B] per step
        ...
    out = generate(model, prompt_ids, 100, greedy=True, eos_id=tok.eos_id)          # list of new ids
    for piece in stream_text(model, tok, "def main(", 100, temperature=0.8):        # text pieces
        print(piece, end="", flush=True)

Every mixer streams (its state holds the TTT inner weights, the KV cache or the SSM state), so a step
costs one T=1 forward. `sample_next` applies, in order: temperature, top-k, top-p (nucleus), then
draws from the remaining distribution; `greedy=True` (or temperature 0) takes the argmax. A `seed`
makes the draws reproducible (a private torch.Generator; the global RNG is left alone).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from .decode_graph import GraphedDecoder
from .model import TTTLM


def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> scaled fp32 logits with the tokens outside top-k / top-p set to -inf."""
    _check_sampling(temperature, top_k, top_p)
    logits = logits.float() / max(float(temperature), 1e-8)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the better tokens
        drop_sorted = before >= top_p  # the top token has before = 0 and is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token for each row of logits [B, V] (or [V]): int64 [B] (or a 0-d tensor)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (1, 2) or not logits.is_floating_point():
        got = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor [B, V] or [V], got {got}")
    _check_sampling(temperature, top_k, top_p)
    if logits.dim() == 1:
        return sample_next(logits[None], temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                           generator=generator)[0]
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _prompt_tensor(prompt, device) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None] if prompt.dim() == 1 else None
        if ids is None or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prompt: expected token ids, int [B, T] or [T], got {prompt.dtype} "
                             f"of shape {tuple(prompt.shape)}")
    else:
        rows = list(prompt)
        if rows and not isinstance(rows[0], (list, tuple)):
            rows = [rows]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("prompt: expected a list of ids or a list of equally long lists of ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) for r in rows for i in r):
            raise ValueError("prompt: expected integer token ids")
        ids = torch.tensor(rows, dtype=torch.int64)
    if ids.shape[1] == 0:
        raise ValueError("prompt: expected at least one token (start with the EOS id to sample from scratch)")
    return ids.to(device=device, dtype=torch.int64)


def stream(model, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, eos_id: int | None = None,
           seed: int | None = None, cuda_graph: bool | None = None,
           compile_decode: bool = False, merge_weights: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids, int64 [B] (on the CPU), one step at a time.

    prompt: int tensor [B, T] or [T], a list of ids, or a list of B equally long lists.
    cuda_graph: replay the decode step as captured CUDA graphs (`ttt.decode_graph`): None = yes on
    CUDA for fixed-size states (TTT and Mamba mixers), True = required (raises where impossible).
    compile_decode: capture the step through torch.compile (`GraphedDecoder(compile=True)`: fewer,
    fused kernels per token; compiles on first use per model and batch size); needs the graphs.
    merge_weights: with the graphs, read the weights that share an input as one concatenated copy (one GEMM
    instead of several per block; those weights' memory again while decoding): None = where the weights allow
    (not inference tensors), True = required, False = never (`GraphedDecoder(merge=...)`). Copies made here
    are dropped when the stream ends.
    Stops after `max_new_tokens` steps, or once every row has produced `eos_id`; rows that finished
    earlier keep yielding `eos_id`. The model runs in eval mode (restored afterwards).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected an int or None, got {seed!r}")
    device = next(model.parameters()).device
    ids = _prompt_tensor(prompt, device)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"prompt: token ids must lie in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")
    mixer = getattr(getattr(model, "cfg", None), "mixer", None)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and mixer not in (None, "attention")
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: expected a model on a CUDA device for cuda_graph=True, got {device}")
    if not isinstance(compile_decode, bool):
        raise ValueError(f"compile_decode: expected a bool, got {compile_decode!r}")
    if compile_decode and not cuda_graph:
        raise ValueError("compile_decode: the compiled step is captured in CUDA graphs; expected a CUDA model "
                         "of a TTT or Mamba mixer with cuda_graph True or None")
    if not isinstance(merge_weights, (bool, type(None))):
        raise ValueError(f"merge_weights: expected a bool or None, got {merge_weights!r}")
    if merge_weights and not cuda_graph:
        raise ValueError("merge_weights: the merged weights serve the CUDA-graphed decoder; expected a CUDA model "
                         "of a TTT or Mamba mixer with cuda_graph True or None")
    if max_new_tokens == 0:
        return
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    was_training = model.training
    had_copies = bool(model.decode_weight_copies()) if isinstance(model, TTTLM) else True
    model.eval()
    try:
        # Grad mode is switched per call, not around the loop: a context held across `yield` would
        # leak into the caller's code between steps.
        with torch.inference_mode():
            logits, state = model(ids, logits="last")  # prefill: one forward over the whole prompt
            decoder = (GraphedDecoder(model, state, compile=compile_decode, merge=merge_weights) if cuda_graph
                       else None)
            if decoder is None and isinstance(model, TTTLM):
                state = model.decode_state(state)  # the fused decode step's own form, where it runs
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            with torch.inference_mode():
                nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                  greedy=greedy, generator=gen)
                if eos_id is not None:
                    nxt = nxt.masked_fill(done, eos_id)
                    done |= nxt == eos_id
            yield nxt.cpu().clone()
            if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                return
            with torch.inference_mode():
                if decoder is not None:  # graph replay of the same step
                    logits = decoder.step(nxt[:, None].to(device))
                else:
                    logits, state = model(nxt[:, None], state)  # decode step: T = 1, state carried
    finally:
        model.train(was_training)
        if not had_copies:  # the copies this stream's decoder made: their memory back
            model.merge_decode_weights(False)


def generate(model, prompt, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, eos_id: int | None = None,
             seed: int | None = None, callback: Callable[[torch.Tensor], None] | None = None,
             cuda_graph: bool | None = None, compile_decode: bool = False,
             merge_weights: bool | None = None) -> list:
    """The new token ids per prompt row: a list of ints for a 1-D prompt, else a list of lists.

    Each row ends before its first `eos_id` (not included). `callback(ids [B])` sees every step as
    it is produced (for streaming); see `stream` for the arguments.
    """
    single = (isinstance(prompt, torch.Tensor) and prompt.dim() == 1) or (
        not isinstance(prompt, torch.Tensor) and len(prompt) > 0 and not isinstance(prompt[0], (list, tuple)))
    steps = []
    for nxt in stream(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      greedy=greedy, eos_id=eos_id, seed=seed, cuda_graph=cuda_graph,
                      compile_decode=compile_decode, merge_weights=merge_weights):
        if callback is not None:
            callback(nxt)
        steps.append(nxt)
    B = _prompt_tensor(prompt, "cpu").shape[0]
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
    if eos_id is not None:
        rows = [r[:r.index(eos_id)] if eos_id in r else r for r in rows]
    return rows[0] if single else rows


def stream_text(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int, **kw) -> Iterator[str]:
    """Yield decoded text pieces of one sample as they are produced (stops at the tokenizer's EOS).

    prompt: text (encoded with `tokenizer`; an empty string starts from EOS) or a list of ids.
    kw: the sampling arguments of `stream`. A piece is held back while it ends inside a multi-byte
    UTF-8 character, so every yielded piece is valid text and their concatenation is the decoding
    of all new tokens.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        ids = [tokenizer.eos_id]
    kw.setdefault("eos_id", tokenizer.eos_id)
    new: list[int] = []
    emitted = 0  # characters of decode(new) already yielded
    for nxt in stream(model, ids, max_new_tokens, **kw):
        tok = int(nxt[0])
        if tok == kw["eos_id"]:
            break
        new.append(tok)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    text = tokenizer.decode(new)
    if len(text) > emitted:
        yield text[emitted:]
