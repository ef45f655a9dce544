"""The chunked head (layers/head.py) and the model's logits / targets modes against plain F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

from ttt.config import get_config
from ttt.layers.head import linear_cross_entropy
from ttt.model import TTTLM


def _ref(h, w, t, reduction, ignore_index=-100):
    return F.cross_entropy((h @ w.T).double(), t, reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_ce_matches_cross_entropy(reduction, chunk):
    g = torch.Generator().manual_seed(0)
    N, D, V = 37, 16, 53
    h = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = t[20] = -100  # ignored rows
    out = linear_cross_entropy(h, w, t, reduction=reduction, chunk=chunk)
    ref = _ref(h, w, t, reduction)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gh, gw = torch.autograd.grad((out * up).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * up).sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_linear_ce_bad_args():
    h, w, t = torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, chunk=0)


@pytest.mark.parametrize("mixer", ["ttt_linear", "attention"])
def test_model_logits_modes_and_loss(mixer):
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=61)).double()
    ids = torch.randint(0, 61, (2, 21))
    y = torch.randint(0, 61, (2, 21))
    full, s_full = model(ids)
    last, s_last = model(ids, logits="last")
    none, s_none = model(ids, logits="none")
    assert none is None and last.shape == (2, 1, 61)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)
    assert s_last.pos == s_none.pos == s_full.pos == 21
    nll, _ = model(ids, targets=y, reduction="none", chunk=5)
    ref_nll = F.cross_entropy(F.linear(model.hidden(ids)[0], model.embed.weight).transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    loss, _ = model(ids, targets=y, chunk=5)
    ref = F.cross_entropy(F.linear(model.hidden(ids)[0], model.embed.weight).flatten(0, 1), y.flatten())
    g = torch.autograd.grad(loss, model.embed.weight)[0]
    gr = torch.autograd.grad(ref, model.embed.weight)[0]
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="logits"):
        model(ids, logits="first")
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=y[:, :3])
