"""lm-evaluation-harness adapter: `TTTEvalLM`, an `lm_eval.api.model.LM` over one of our models, and
`run_lm_eval` behind `ttt lm-eval` (optional extra: pip install 'ttt-lm[lm_eval]').

    lm = eval_lm_class().from_run("runs/x", device="cuda", max_length=2048)   # a TTTEvalLM
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

Scoring is exact for any length: a sequence longer than `max_length` tokens runs in windows of
`max_length` with the recurrent state carried from one window to the next, so every token is scored with
its whole left context (no sliding-window approximation). Batches are right-padded: a causal model's
outputs at a position never depend on later positions. An empty context starts from the prefix token
(the tokenizer's "<s>" when it has one, as the Llama-2-tokenized released models saw at document starts,
else its EOS). generate_until decodes greedily (sampling settings in a task's gen_kwargs are not used).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

INSTALL = "lm-eval is not installed: pip install 'ttt-lm[lm_eval]' (lm-eval>=0.4)"
EOS_NAMES = ("<|eos|>", "</s>", "<|endoftext|>")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ImportError(INSTALL) from None
    return LM


class _Tok:
    """The HF tokenizers file of a run, for scoring: ids without added specials, a prefix and an EOS id."""

    def __init__(self, path: Path, vocab_size: int):
        from tokenizers import Tokenizer

        try:
            self.hf = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"--tokenizer: {str(path)!r} is not a valid tokenizer.json ({e})") from None
        n = self.hf.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise ValueError(f"--tokenizer: its vocabulary ({n}) is larger than the model's ({vocab_size}); it is not "
                             f"this model's tokenizer")
        eos = [self.hf.token_to_id(t) for t in EOS_NAMES if self.hf.token_to_id(t) is not None]
        if not eos:
            raise ValueError(f"--tokenizer: {str(path)!r} has no end-of-text token (one of {EOS_NAMES})")
        self.eos_id = eos[0]
        bos = self.hf.token_to_id("<s>")
        self.prefix_id = bos if bos is not None else self.eos_id
        self.hf.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def find_tokenizer(run, tokenizer=None) -> Path:
    """--tokenizer, else the tokenizer.json of the run (or checkpoint) dir, else of the run's training data."""
    from .checkpoint import CONFIG_FILE, read_json, resolve

    if tokenizer:
        return Path(tokenizer)
    ck = resolve(run)
    train = read_json(ck / CONFIG_FILE).get("train")
    data = [Path(train["data_dir"]) / "tokenizer.json"] if isinstance(train, dict) and isinstance(
        train.get("data_dir"), str) else []
    for c in (Path(run) / "tokenizer.json", ck / "tokenizer.json", *data):
        if c.is_file():
            return c
    raise ValueError(f"--tokenizer: {str(run)!r} holds no tokenizer.json; pass --tokenizer (the released models "
                     f"use Llama-2's tokenizer.json)")


def _make_class():
    LM = _lm_base()

    class TTTEvalLM(LM):
        """lm_eval LM over a TTTLM and its tokenizer (see the module docstring)."""

        def __init__(self, model, tokenizer: _Tok, *, batch_size: int = 8, max_length: int = 2048,
                     max_gen_toks: int = 256):
            super().__init__()
            self.model, self.tok = model.eval(), tokenizer
            self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks

        @classmethod
        def from_run(cls, run, *, tokenizer=None, device="cpu", **kw):
            from .checkpoint import load_model

            model, cfg = load_model(run, device)
            return cls(model, _Tok(find_tokenizer(run, tokenizer), cfg.vocab_size), **kw)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # trailing spaces of the context belong to the continuation's first token
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            whole = self.tok.encode(context + continuation)
            ctx = self.tok.encode(context)
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)
            return [self.tok.prefix_id] + ctx, cont

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(sum log p(cont | ctx), greedy-equal) per (ctx ids, cont ids), longest first in batches."""
            order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
            res = [None] * len(pairs)
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                seqs = [pairs[i][0] + pairs[i][1] for i in idx]
                lps, greedy = self._logprobs_and_greedy(seqs)
                for i, lp, g in zip(idx, lps, greedy):
                    n = len(pairs[i][1])
                    res[i] = (float(lp[-n:].sum()), bool(g[-n:].all()))
            return res

        def _logprobs_and_greedy(self, seqs):
            device = next(self.model.parameters()).device
            T = max(len(s) for s in seqs) - 1
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            tgt = torch.zeros(len(seqs), T, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s) - 1] = torch.tensor(s[:-1])
                tgt[i, :len(s) - 1] = torch.tensor(s[1:])
            ids, tgt = ids.to(device), tgt.to(device)
            lps, eqs, state = [], [], None
            with torch.no_grad():
                for a in range(0, T, self.max_length):
                    logits, state = self.model(ids[:, a:a + self.max_length], state)  # [B, w, V]
                    t = tgt[:, a:a + self.max_length]
                    lps.append(torch.gather(F.log_softmax(logits.float(), -1), -1, t[..., None])[..., 0])
                    eqs.append(logits.argmax(-1) == t)
            lp, eq = torch.cat(lps, 1).cpu(), torch.cat(eqs, 1).cpu()  # [B, T]
            return ([lp[i, :len(s) - 1] for i, s in enumerate(seqs)], [eq[i, :len(s) - 1] for i, s in enumerate(seqs)])

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._score([self._encode_pair(*r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # the whole document in one sequence: windows of max_length carry the state (exact, no overlap)
            pairs = [([self.tok.prefix_id], self.tok.encode(r.args[0])) for r in requests]
            out = [0.0] * len(pairs)
            todo = [i for i, p in enumerate(pairs) if p[1]]
            for i, (ll, _) in zip(todo, self._score([pairs[i] for i in todo])):
                out[i] = ll
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:
                context, kw = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n_max = int(kw.get("max_gen_toks", self.max_gen_toks))
                ids = [self.tok.prefix_id] + self.tok.encode(context)
                out.append(self._greedy(ids, until, n_max))
            return out

        @torch.no_grad()
        def _greedy(self, ids: list[int], until: list[str], n_max: int) -> str:
            device = next(self.model.parameters()).device
            x = torch.tensor([ids], device=device)
            state = None
            for a in range(0, x.shape[1], self.max_length):  # prefill in windows, state carried
                logits, state = self.model(x[:, a:a + self.max_length], state, logits="last")
            new: list[int] = []
            for _ in range(n_max):
                nxt = int(logits[0, -1].argmax())
                if nxt == self.tok.eos_id:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                cut = [text.index(u) for u in until if u and u in text]
                if cut:
                    return text[:min(cut)]
                logits, state = self.model(torch.tensor([[nxt]], device=device), state)
            return self.tok.decode(new)

    return TTTEvalLM


@functools.cache
def eval_lm_class():
    """The adapter class, `TTTEvalLM` (created on first use, so importing this module needs no lm_eval)."""
    return _make_class()


def run_lm_eval(run, tasks: list[str], *, include_path=None, limit=None, batch_size: int = 8, device="cpu",
                tokenizer=None, max_length: int = 2048) -> dict:
    """lm_eval.simple_evaluate over our model; {'results': {task: metrics}, 'configs', 'versions', ...}.
    Unknown task names raise a ValueError naming them."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(INSTALL) from None
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path: {str(include_path)!r} is not a directory")
    lm = eval_lm_class().from_run(run, tokenizer=tokenizer, device=device, batch_size=batch_size,
                                  max_length=max_length)
    tm = None
    if include_path is not None:  # local tasks only: skip indexing lm-eval's thousands of built-in tasks
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(t in tm.all_tasks for t in tasks):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown to lm-eval: {', '.join(unknown)} (see `lm-eval ls tasks`, or "
                         f"--include-path for local YAML tasks)")
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, batch_size=batch_size,
                                  log_samples=False)
    return {k: res[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better") if k in res}
