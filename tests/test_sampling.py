"""Tier 2 for nanorlhf.sampling: KV cache vs recompute, greedy limit, mixture distribution, batch invariance."""
import types

import pytest
import torch
import torch.nn.functional as F

from nanorlhf import Tracker, generate, generate_mixture, pad, rollout_seeds, truncate_at_eos
from nanorlhf.world import make_model

PROMPTS = [[4, 6, 24, 25, 5], [4, 7, 26, 5], [4, 6, 28, 29, 30, 5], [4, 7, 31, 5]]


def _batch(rows):
    return pad(rows, 0, side="left")


def _kw(tokenizer, seeds, **kw):
    return dict(max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                seeds=seeds, **kw)


def test_seeds_depend_on_seed_prompt_and_sample_only():
    assert rollout_seeds(0, [3, 5], 1) == [rollout_seeds(0, [3], 1)[0], rollout_seeds(0, [5], 1)[0]]
    assert len({*rollout_seeds(0, range(50), 0), *rollout_seeds(0, range(50), 1), *rollout_seeds(1, range(50))}) == 150


def test_kv_cache_equals_full_recompute(tiny_lm, tokenizer):
    ids, mask = _batch(PROMPTS)
    seeds = rollout_seeds(7, range(4))
    a = generate(tiny_lm, ids, mask, **_kw(tokenizer, seeds, temperature=1.0, top_k=20, top_p=0.9))
    b = generate(tiny_lm, ids, mask, **_kw(tokenizer, seeds, temperature=1.0, top_k=20, top_p=0.9, use_cache=False))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)


def test_temperature_to_zero_is_argmax(tiny_lm, tokenizer):
    ids, mask = _batch(PROMPTS)
    seeds = rollout_seeds(0, range(4))
    cold = generate(tiny_lm, ids, mask, **_kw(tokenizer, seeds, temperature=1e-4))[0]
    greedy = generate(tiny_lm, ids, mask, **_kw(tokenizer, seeds, temperature=0))[0]
    top1 = generate(tiny_lm, ids, mask, **_kw(tokenizer, seeds, top_k=1))[0]
    # hand-rolled argmax loop without cache
    seq, m, toks = ids, mask, []
    for _ in range(10):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        nxt = tiny_lm(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1)
        toks.append(nxt)
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    manual, _ = truncate_at_eos(torch.stack(toks, 1), tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(cold, manual[:, :cold.shape[1]]) and torch.equal(greedy, cold) and torch.equal(top1, cold)


def test_rollout_independent_of_batching(tiny_lm, tokenizer):
    ids, mask = _batch(PROMPTS)
    whole = generate(tiny_lm, ids, mask, **_kw(tokenizer, rollout_seeds(3, range(4), 1), temperature=0.9))
    for part in ([0, 2], [3], [1, 3]):
        i, m = _batch([PROMPTS[j] for j in part])
        sub = generate(tiny_lm, i, m, **_kw(tokenizer, rollout_seeds(3, part, 1), temperature=0.9))
        for r, j in enumerate(part):
            n = int(sub[1][r].sum())
            assert torch.equal(sub[0][r, :n], whole[0][j, :n]) and int(whole[1][j].sum()) == n


def test_stops_at_eos_and_masks(tiny_lm, tokenizer):
    ids, mask = _batch(PROMPTS * 8)
    toks, m, lp = generate(tiny_lm, ids, mask, **_kw(tokenizer, rollout_seeds(0, range(32))))
    for row, mrow in zip(toks, m):
        n = int(mrow.sum())
        assert mrow[:n].all() and not mrow[n:].any()
        assert (row[n:] == tokenizer.pad_token_id).all()
        assert tokenizer.eos_token_id not in row[:n - 1].tolist()
    assert (lp[~m] == 0).all() and (lp[m] < 0).all()


def test_mixture_logprobs_equal_geometric_mixture(tiny_lm, tokenizer):
    ref = make_model(tokenizer, seed=2).eval()
    ids, mask = _batch(PROMPTS)
    alpha, T = 0.3, 0.8
    toks, m, lp = generate_mixture(tiny_lm, ref, alpha, ids, mask,
                                   **_kw(tokenizer, rollout_seeds(0, range(4)), temperature=T))
    full_ids = torch.cat([ids, toks], 1)
    full_mask = torch.cat([mask, torch.ones_like(toks)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    P, L = ids.shape[1], toks.shape[1]
    with torch.no_grad():
        z = [mod(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits[:, P - 1:P + L - 1]
             for mod in (ref, tiny_lm)]
    mix = F.log_softmax((alpha * z[0] + (1 - alpha) * z[1]) / T, -1).gather(-1, toks[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, mix * m, atol=1e-5, rtol=0)


def test_mixture_first_token_frequencies(tiny_lm, tokenizer):
    # empirical next-token frequencies over 4000 draws match softmax(alpha z_ref + (1 - alpha) z_theta)
    ref = make_model(tokenizer, seed=2).eval()
    n, alpha = 4000, 0.5
    ids, mask = _batch([PROMPTS[0]] * n)
    toks, _, _ = generate_mixture(tiny_lm, ref, alpha, ids, mask, max_new_tokens=1, eos_token_id=1,
                                  pad_token_id=0, seeds=rollout_seeds(0, range(n)))
    with torch.no_grad():
        x = torch.tensor([PROMPTS[0]])
        p = F.softmax(alpha * ref(input_ids=x).logits[0, -1] + (1 - alpha) * tiny_lm(input_ids=x).logits[0, -1], -1)
    freq = torch.bincount(toks[:, 0], minlength=p.numel()).float() / n
    assert (freq - p).abs().max().item() < 0.025


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mixture_endpoints_are_plain_samples(tiny_lm, tokenizer, alpha):
    ref = make_model(tokenizer, seed=2).eval()
    ids, mask = _batch(PROMPTS)
    kw = _kw(tokenizer, rollout_seeds(5, range(4), 1), temperature=0.9)
    mixed = generate_mixture(tiny_lm, ref, alpha, ids, mask, **kw)
    plain = generate(ref if alpha == 1.0 else tiny_lm, ids, mask, **kw)
    assert torch.equal(mixed[0], plain[0])
    with pytest.raises(ValueError, match="mixture_coef"):
        generate_mixture(tiny_lm, ref, 1.5, ids, mask, **kw)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prefill_computes_last_position_logits_only(tiny_lm, tokenizer, use_cache):
    # the prompt forward must not materialize (B, P, V) logits: for a 150k vocabulary, 64 rows and
    # 512-token prompts that is ~10 GB; every forward of the sampler returns one position
    shapes = []
    hook = tiny_lm.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.logits.shape)))
    try:
        ids, mask = _batch(PROMPTS)
        generate(tiny_lm, ids, mask, **_kw(tokenizer, rollout_seeds(0, range(4)), use_cache=use_cache))
    finally:
        hook.remove()
    assert len(shapes) > 1 and all(s == (4, 1, len(tokenizer)) for s in shapes), shapes


def _halves(out, B):
    """(tokens, mask, logps) of rows [:B] and [B:], each cut to its own longest completion."""
    return [tuple(t[s, :int(out[1][s].sum(1).max())] for t in out) for s in (slice(0, B), slice(B, None))]


@pytest.mark.parametrize("alpha", [0.3, 1.0], ids=["nash-md", "xpo-reference"])
def test_one_call_for_two_samples_equals_two_calls(tiny_lm, tokenizer, alpha):
    # Nash-MD: y (alpha 0) and y' (alpha 0.3) in one call; XPO: y and the reference's y~ (alpha 1): every
    # row's tokens, mask and log-probs are those of its own call
    torch.manual_seed(1)
    ref = make_model(tokenizer)
    ids, mask = _batch(PROMPTS)
    s0, s1 = rollout_seeds(5, range(4), 0), rollout_seeds(5, range(4), 1)
    kw = dict(max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    both = generate_mixture(tiny_lm, ref, [0.0] * 4 + [alpha] * 4, ids.repeat(2, 1), mask.repeat(2, 1),
                            seeds=s0 + s1, **kw)
    y = generate(tiny_lm, ids, mask, seeds=s0, **kw)
    y2 = generate_mixture(tiny_lm, ref, alpha, ids, mask, seeds=s1, **kw)
    for got, want in zip(_halves(both, 4), (y, y2)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert ids.shape[0] * 2 == both[0].shape[0] and both[0].shape[1] == max(y[0].shape[1], y2[0].shape[1])


def test_online_dpo_one_call_of_2b_rows_equals_two_calls(tiny_lm, tokenizer):
    ids, mask = _batch(PROMPTS)
    s0, s1 = rollout_seeds(9, range(4), 0), rollout_seeds(9, range(4), 1)
    both = generate(tiny_lm, ids.repeat(2, 1), mask.repeat(2, 1), **_kw(tokenizer, s0 + s1))
    for got, want in zip(_halves(both, 4), (generate(tiny_lm, ids, mask, **_kw(tokenizer, s)) for s in (s0, s1))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rollouts_chunks_and_evaluation(tiny_lm, tokenizer, tmp_path):
    from nanorlhf import Rollouts
    rows, seeds = PROMPTS * 2, rollout_seeds(2, range(8))
    kw = dict(device=torch.device("cpu"), max_new_tokens=10, temperature=0.9, eos_token_id=tokenizer.eos_token_id)
    whole = Rollouts(tiny_lm, tokenizer, batch_size=8, **kw)
    a, b = whole.sample(rows, seeds), Rollouts(tiny_lm, tokenizer, batch_size=3, **kw).sample(rows, seeds)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    ids, mask, tokens, cmask = a
    lp = whole.logprobs(tiny_lm, ids, mask, tokens, cmask)  # = the sampler's own log-probs at its temperature
    want = generate(tiny_lm, ids, mask, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, seeds=seeds, temperature=0.9)[2]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)
    # evaluation against the model itself: kl 0; the metrics of a run without a reward model
    tracker = Tracker(types.SimpleNamespace(output_dir=str(tmp_path)))  # samples.jsonl only (no --report_to)
    out = whole.evaluate(3, tiny_lm, None, ["p"] * 8, rows, seed=2, tracker=tracker,
                         gold_reward=lambda p, c: [float(len(x)) for x in c])
    assert abs(out["eval/kl"]) < 1e-5 and set(out) == {"eval/kl", "eval/length", "eval/gold_reward"}
    assert (tmp_path / "samples.jsonl").read_text().count('"step": 3') == 4
