"""transformers interop: after `import ttt.hf`, AutoModelForCausalLM.from_pretrained(RUN_DIR) gives a model
whose generate() carries our recurrent state (one token per step after the prompt) and produces the same
greedy tokens as our own generate."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from ttt.config import get_config  # noqa: E402
from ttt.generate import generate  # noqa: E402
from ttt.model import TTTLM  # noqa: E402


@pytest.mark.parametrize("mixer,backbone", [("ttt_linear", "mamba"), ("ttt_mlp", "transformer")])
def test_auto_model_generate_matches_ours(tmp_path, mixer, backbone):
    import ttt.hf  # noqa: F401  (registers the auto classes)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_config("debug", mixer=mixer, backbone=backbone, vocab_size=100, mini_batch=4)
    model = TTTLM(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ttt_lm", "model": cfg.to_dict(),
                                                      "vocab_size": 100}))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert isinstance(hf, ttt.hf.TTTForCausalLMHF)
    lengths = []
    hf.lm.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    out = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 7:], torch.tensor(generate(model, ids, 12, greedy=True)))
    assert lengths == [7] + [1] * 11  # the prompt once, then one token per step: the state is the cache


def test_from_pretrained_plain_run_dir(tmp_path):
    """A run directory without model_type loads through the class itself, with the same logits."""
    from ttt.hf import TTTForCausalLMHF

    cfg = get_config("debug", vocab_size=50)
    model = TTTLM(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "vocab_size": 50}))
    hf = TTTForCausalLMHF.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids)[0])
        loss = hf(ids, labels=ids).loss
        want = torch.nn.functional.cross_entropy(model(ids)[0][0, :-1], ids[0, 1:])
    assert torch.allclose(loss, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_on_cuda(tmp_path):
    """generate() on CUDA (Triton kernels for prefill and decode) gives our own CUDA greedy tokens."""
    import ttt.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_config("debug", vocab_size=100)
    model = TTTLM(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ttt_lm", "model": cfg.to_dict(),
                                                      "vocab_size": 100}))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), device="cuda")
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(1)).cuda()
    out = hf.generate(ids, max_new_tokens=16, do_sample=False)
    want = generate(model.cuda(), ids, 16, greedy=True, cuda_graph=False)
    assert out[:, 21:].cpu().tolist() == want
