"""Tier 1 and 2 for nanorlhf.ops: hand-computed masks and KL, log-prob equivalences."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanorlhf import (completion_logprobs, entropy_from_logits, global_whiten, kl_estimators, masked_mean,
                      selective_log_softmax, truncate_at_eos)
import nanorlhf.ops as ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_log_softmax_and_cross_entropy(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).to(dtype)
    index = torch.randint(0, 11, (3, 5), generator=g)
    got = selective_log_softmax(logits, index, temperature)
    ref = F.log_softmax(logits / temperature, -1).gather(-1, index[..., None]).squeeze(-1)
    ce = -F.cross_entropy((logits / temperature).reshape(-1, 11), index.reshape(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, ce, atol=1e-6, rtol=0)
    assert got.dtype == dtype


def test_selective_log_softmax_bf16_is_row_wise_exact():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 13, generator=g) * 3).bfloat16()
    index = torch.randint(0, 13, (2, 4), generator=g)
    got = selective_log_softmax(logits, index, 0.9)
    ref = F.log_softmax(logits.float() / 0.9, -1).gather(-1, index[..., None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selective_log_softmax_chunks_and_gradient(monkeypatch, dtype):
    # a tiny chunk forces many chunks; values and gradients match the unchunked computation
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 30)  # 24 rows of 10 -> 8 chunks of 3 rows
    assert len(list(ops._chunks(torch.zeros(4, 6, 10)))) == 8
    logits = torch.randn(4, 6, 10, dtype=torch.float64).to(dtype).requires_grad_()
    index = torch.randint(0, 10, (4, 6))
    weights = torch.randn(4, 6, dtype=torch.float64)  # a gradient that differs per position
    got = selective_log_softmax(logits, index, 0.7)
    ref = F.log_softmax(ops._up(logits) / 0.7, -1).gather(-1, index[..., None]).squeeze(-1)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype != torch.float64 else dict(atol=1e-12, rtol=0)
    torch.testing.assert_close(got, ref, **tol)
    (g1,) = torch.autograd.grad((got * weights.to(got.dtype)).sum(), logits)
    (g2,) = torch.autograd.grad((ref * weights.to(ref.dtype)).sum(), logits)
    assert g1.dtype == dtype
    torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_saves_no_full_copy_for_backward(monkeypatch, dtype):
    # bytes saved for backward beyond the logits themselves (which the model's output holds anyway):
    # one logsumexp per row and the index, never a (B, T, V) float32 log-softmax (temperature != 1 and
    # bf16 both used to save a full-size copy: measured ratio 1.00)
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 1000)
    B, T, V = 4, 16, 500
    logits = torch.randn(B, T, V).to(dtype).requires_grad_()
    index = torch.randint(0, V, (B, T))
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_log_softmax(logits, index, 0.7).sum().backward()
    assert sum(extra) <= B * T * (8 + 8), f"saved {sum(extra)} bytes besides the logits"  # index + lse
    assert sum(extra) < 0.01 * B * T * V * 4


def test_entropy_from_logits():
    # uniform over 4 -> ln 4; one-hot-ish -> ~0; and against -sum p log p
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    z = torch.randn(3, 7)
    p = F.softmax(z / 0.5, -1)
    torch.testing.assert_close(entropy_from_logits(z, 0.5), -(p * p.log()).sum(-1))
    assert (entropy_from_logits(torch.randn(5, 9) * 10) >= 0).all()


def test_truncate_at_eos():
    eos, pad = 1, 0
    toks = torch.tensor([[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [1, 8, 8, 8, 8]])
    out, mask = truncate_at_eos(toks, eos, pad)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    assert out.tolist() == [[5, 6, 1, 0, 0], [5, 5, 5, 5, 5], [1, 0, 0, 0, 0]]
    _, mask2 = truncate_at_eos(torch.tensor([[5, 9, 6]]), [9, 1], pad)  # several stop ids
    assert mask2.tolist() == [[True, True, False]]


def test_masked_reductions_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[True, True, False], [True, True, True]])
    assert masked_mean(x, m).item() == pytest.approx(15 / 5)
    assert masked_mean(x, m, dim=-1).tolist() == [1.5, 4.0]
    # whitening the masked entries (PPO's advantages): values 1,2,3,4,5, mean 3, unbiased var (4+1+0+1+4)/4 = 2.5
    w = global_whiten(x[m])
    torch.testing.assert_close(w, (torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]) - 3) / 2.5**0.5)
    # shift_mean=False (whiten_rewards): only the scale changes, the mean 3 stays
    torch.testing.assert_close(global_whiten(x[m], shift_mean=False), (x[m] - 3) / 2.5**0.5 + 3)


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    kl = kl_estimators(logp, ref, mask)
    # r = [0.5, -1, (masked)]
    torch.testing.assert_close(kl["k1"], torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl["k2"], torch.tensor([[0.125, 0.5, 0.0]]))
    # k3 = e^-r - 1 + r: e^-0.5 - 0.5 = 0.10653066; e^1 - 2 = 0.71828183
    torch.testing.assert_close(kl["k3"], torch.tensor([[0.10653066, 0.71828183, 0.0]]))


def test_completion_logprobs_only_completion_positions(tiny_lm):
    # left-padded prompt row vs the same row unpadded, and vs a hand-rolled full forward
    prompt = torch.tensor([[0, 0, 6, 24, 25], [4, 7, 26, 27, 5]])
    pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    comp = torch.tensor([[8, 9, 1], [10, 11, 12]])
    with torch.no_grad():
        lp, ent = completion_logprobs(tiny_lm, prompt, pmask, comp, temperature=0.8, with_entropy=True)
        solo = completion_logprobs(tiny_lm, prompt[:1, 2:], pmask[:1, 2:], comp[:1], temperature=0.8)
        full = tiny_lm(input_ids=torch.cat([prompt[1:], comp[1:]], 1)).logits[0, 4:7]
    torch.testing.assert_close(lp[0], solo[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[1], F.log_softmax(full / 0.8, -1).gather(-1, comp[1, :, None]).squeeze(-1),
                               atol=1e-5, rtol=0)
    assert ent.shape == (2, 3) and (ent > 0).all()


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["shared-prompt", "gradient-checkpointing"])
def test_shared_prompts_run_once_with_the_numbers_and_gradients_of_the_full_forward(tokenizer, grad_ckpt):
    # rows [k, B]: 3 samples of 2 left-padded prompts (RLOO's layout), plus a lone prompt; the shared path runs
    # 3 distinct prompts once each, then the completions on their KV caches; log-probs, entropy and every
    # parameter's gradient equal those of one forward of each row's concatenation
    from nanorlhf.world import make_model
    prompts = torch.tensor([[0, 0, 6, 24, 25], [4, 7, 26, 27, 5]]).repeat(3, 1)
    prompts = torch.cat([prompts, torch.tensor([[0, 4, 6, 28, 5]])])
    pmask = (prompts != 0).long()
    comp = torch.randint(6, 32, (7, 4), generator=torch.Generator().manual_seed(0))
    model = make_model(tokenizer, seed=2).train()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    lp, ent = completion_logprobs(model, prompts, pmask, comp, temperature=0.7, with_entropy=True)
    lp.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = torch.cat([completion_logprobs(model, prompts[i:i + 1], pmask[i:i + 1], comp[i:i + 1], temperature=0.7)
                      for i in range(7)])  # one row at a time: nothing shared
    want.sum().backward()
    hook.remove()
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    assert ent.shape == (7, 4)
    # shared: the 3 distinct prompts (3, 5), then the 7 completions but their last token (7, 3); else (7, 5 + 4)
    assert calls[:2] == [(3, 5), (7, 3)] if not grad_ckpt else calls[0] == (7, 9)
