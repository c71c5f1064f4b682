"""Tier 1 for GRPO (TRL 1.16's semantics): hand-computed advantages for every scale_rewards and losses for every
loss_type, plus the equivalence that makes dapo a mean over the whole optimizer step's tokens."""
import math

import pytest
import torch

from nanorlhf import grpo_advantages, grpo_loss, nanstd

# [G=2, B=2]: prompt 0 got rewards {1, 3} (rows 0 and 2), prompt 1 got {0, 4} (rows 1 and 3)
R = torch.tensor([1.0, 0.0, 3.0, 4.0])


def test_advantages_group():
    # prompt 0: mean 2, sample std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2 = 1.4142136
    # prompt 1: mean 2, std sqrt((4 + 4) / 1) = sqrt 8 = 2.8284271
    # A = (r - 2) / (std + 1e-4): -1/1.4143136 = -0.7070568, -2/2.8285271 = -0.7070818, and their negatives
    adv, std = grpo_advantages(R, 2, "group")
    assert adv.tolist() == pytest.approx([-0.7070568, -0.7070818, 0.7070568, 0.7070818], abs=1e-6)
    assert std.tolist() == pytest.approx([1.4142136, 2.8284271, 1.4142136, 2.8284271], abs=1e-6)


def test_advantages_batch_and_none():
    # batch: the same numerators, divided by the std of all four: mean 2, (1 + 4 + 1 + 4) / 3 = 3.3333,
    # std 1.8257419; /(1.8258419): -1 -> -0.5476925, -2 -> -1.0953851
    adv, std = grpo_advantages(R, 2, "batch")
    assert adv.tolist() == pytest.approx([-0.5476925, -1.0953851, 0.5476925, 1.0953851], abs=1e-6)
    assert std.tolist() == pytest.approx([1.8257419] * 4, abs=1e-6)
    # none (Dr. GRPO): r - group mean, no division; std is still the group's (for frac_reward_zero_std)
    adv, std = grpo_advantages(R, 2, "none")
    assert adv.tolist() == [-1.0, -2.0, 1.0, 2.0]
    assert std.tolist() == pytest.approx([1.4142136, 2.8284271, 1.4142136, 2.8284271], abs=1e-6)


def test_advantages_identities_and_unscorable():
    r = torch.randn(4 * 3)
    adv, _ = grpo_advantages(r, 4, "none")
    assert adv.view(4, 3).sum(0).abs().max() < 1e-6  # zero-sum per group
    adv, _ = grpo_advantages(r, 4, "group")  # group-normalized: sample std 1 (up to the 1e-4)
    assert adv.view(4, 3).std(0).tolist() == pytest.approx([1.0] * 3, abs=1e-3)
    # equal rewards in a group: A = 0 and std 0 (frac_reward_zero_std counts it)
    adv, std = grpo_advantages(torch.tensor([1.0, 2.0, 1.0, 5.0]), 2)
    assert adv[0] == adv[2] == 0.0 and std[0] == 0.0
    # NaN (every function returned None): out of the mean and std, its A = 0; a group of one scorable value has no
    # std (NaN), so its A is 0 too. [G=2, B=3]: prompt 0 {1, 2}, prompt 1 {NaN, 5}, prompt 2 {3, 0}
    adv, std = grpo_advantages(torch.tensor([1.0, math.nan, 3.0, 2.0, 5.0, 0.0]), 2)
    # prompt 0: mean 1.5, std 0.7071068 -> -/+0.5/0.7072068 = 0.7070068; prompt 2: mean 1.5, std sqrt(4.5) =
    # 2.1213203 -> +/-1.5/2.1214203 = 0.7070734
    assert adv.tolist() == pytest.approx([-0.7070068, 0.0, 0.7070734, 0.7070068, 0.0, -0.7070734], abs=1e-6)
    assert math.isnan(std[1]) and math.isnan(std[4]) and std[2].item() == pytest.approx(2.1213203, abs=1e-6)


def test_advantages_refuse_bad_arguments():
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(R, 2, "mean")
    with pytest.raises(ValueError, match="num_generations"):
        grpo_advantages(R, 3)


def test_nanstd():
    # ddof 1 over the non-NaN values: {1, 3}: sqrt(2); one value: NaN (TRL's nanstd)
    assert nanstd(torch.tensor([1.0, math.nan, 3.0])).item() == pytest.approx(math.sqrt(2))
    assert math.isnan(nanstd(torch.tensor([math.nan, 3.0])).item())


# two completions, three positions; row 0 ended after 2 tokens; A = +1 for row 0, -1 for row 1
MASK = torch.tensor([[True, True, False], [True, True, True]])
A = torch.tensor([1.0, -1.0])
LOGPS = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -1.0, -1.5]])
RATIOS = torch.tensor([[1.5, 0.5, 7.0], [1.1, 0.7, 1.3]])  # position (0, 2) is after the end: never counted
OLD = LOGPS - RATIOS.log()


def loss(loss_type, **kw):
    x = LOGPS.clone().requires_grad_()
    out, stats = grpo_loss(x, OLD, A, MASK, loss_type, 0.2, kw.pop("epsilon_high", 0.2), **kw)
    out.backward()
    return out.item(), {k: (s / n).item() for k, (s, n) in stats.items()}, x.grad


def test_token_losses_by_hand():
    # row 0 (A = 1): rho 1.5 -> min(1.5, clip 1.2) = 1.2 -> -1.2 (high-clipped); rho 0.5 -> min(0.5, 0.8) -> -0.5
    # row 1 (A = -1): rho 1.1 -> 1.1; rho 0.7 -> -min(-0.7, -0.8) = 0.8 (low-clipped); rho 1.3 -> -min(-1.3, -1.2)
    #   = 1.3 (not clipped: the clip only bounds a gain)
    # per-token losses [-1.2, -0.5 | 1.1, 0.8, 1.3], sum 1.5 over 5 tokens
    value, stats, grad = loss("grpo")  # per-completion means: (-1.7/2 + 3.2/3) / 2 = (-0.85 + 1.0666667) / 2
    assert value == pytest.approx(0.1083333, abs=1e-6)
    assert stats == pytest.approx({"clip_ratio/low_mean": 0.2, "clip_ratio/high_mean": 0.2,
                                   "clip_ratio/region_mean": 0.4})
    # gradient: clipped tokens none; row 0 token 1: -A rho / 2 rows / 2 tokens = -0.5 / 4 = -0.125
    assert grad[0].tolist() == pytest.approx([0.0, -0.125, 0.0])
    assert grad[1].tolist() == pytest.approx([1.1 / 6, 0.0, 1.3 / 6])  # -A rho / 2 / 3
    assert loss("bnpo")[0] == pytest.approx(1.5 / 5)  # 0.3
    assert loss("dr_grpo", max_completion_length=4)[0] == pytest.approx(1.5 / (2 * 4))  # 0.1875
    assert loss("dapo")[0] == pytest.approx(1.5 / 5)  # this batch's tokens by default
    assert loss("dapo", num_items_in_batch=10)[0] == pytest.approx(0.15)  # the step's 10 tokens


def test_epsilon_high_clips_higher():
    # DAPO's clip-higher, epsilon_high 0.6: rho 1.5 < 1.6 is no longer clipped: row 0 -> [-1.5, -0.5]
    value, stats, _ = loss("bnpo", epsilon_high=0.6)
    assert value == pytest.approx((-2.0 + 3.2) / 5)  # 0.24
    assert stats["clip_ratio/high_mean"] == 0.0 and stats["clip_ratio/low_mean"] == pytest.approx(0.2)


def test_sequence_level_gspo():
    # rho per completion = exp(mean log-ratio): row 0 sqrt(1.5 x 0.5) = 0.8660254, row 1 (1.1 x 0.7 x 1.3)^(1/3)
    # = 1.001^(1/3) = 1.0003332; losses -0.8660254 and +1.0003332 on every token of each
    value, stats, _ = loss("grpo", importance_sampling_level="sequence")
    assert value == pytest.approx((-0.8660254 + 1.0003332) / 2, abs=1e-6)  # 0.0671539
    assert stats["clip_ratio/region_mean"] == 0.0  # counted per completion: none of 2
    # bnpo sums a completion's loss on each of its tokens: (2 x -0.8660254 + 3 x 1.0003332) / 5
    assert loss("bnpo", importance_sampling_level="sequence")[0] == pytest.approx(0.2537898, abs=1e-6)


def test_one_token_completions_count_their_real_tokens():
    # token level with T = 1 (not to be read as one ratio per completion): row 1 is masked out, so of the one real
    # token (rho 1.5, A = 1, high-clipped) the clip ratio is 1/1, not 1/2
    _, stats = grpo_loss(torch.tensor([[-1.0], [-2.0]]), torch.tensor([[-1.0 - math.log(1.5)], [-9.0]]), A,
                         torch.tensor([[True], [False]]), "bnpo")
    assert {k: (s / n).item() for k, (s, n) in stats.items()}["clip_ratio/high_mean"] == pytest.approx(1.0)


def test_cispo_by_hand():
    # -sg(min(rho, eps_high)) A l, eps_high 1.2 a cap of the ratio itself:
    # row 0: -1.2 x 1 x -1 = 1.2; -0.5 x 1 x -2 = 1.0; row 1: -1.1 x -1 x -0.5 = -0.55; -0.7 x -1 x -1 = -0.7;
    # -1.2 x -1 x -1.5 = -1.8; sum -0.85 over 5 tokens
    value, stats, grad = loss("cispo", epsilon_high=1.2)
    assert value == pytest.approx(-0.17)
    assert stats == pytest.approx({"cispo_clip_ratio": 0.2})  # rho 1.5 > 1.2 with A > 0
    assert grad[0].tolist() == pytest.approx([-1.2 / 5, -0.5 / 5, 0.0])  # the capped token still has a gradient


def test_k3_kl_and_bias_correction():
    # on-policy (rho 1), beta 0.1, lref - l = d: [0.5, -0.5 | 0, 0, 1]; k3 = e^d - d - 1:
    # 0.1487213, 0.1065307, 0, 0, 0.7182818 (sum 0.9735338); policy part sum(-A) = -2 + 3 = 1
    d = torch.tensor([[0.5, -0.5, 3.0], [0.0, 0.0, 1.0]])
    for bias in (True, False):
        x = LOGPS.clone().requires_grad_()
        out, stats = grpo_loss(x, LOGPS, A, MASK, "bnpo", 0.2, 0.2, beta=0.1, ref_logps=LOGPS + d,
                               use_bias_correction_kl=bias)
        out.backward()
        assert out.item() == pytest.approx((1 + 0.1 * 0.9735338) / 5, abs=1e-6)  # 0.2194707
        assert (stats["kl"][0] / stats["kl"][1]).item() == pytest.approx(0.9735338 / 5, abs=1e-6)
        # d/dl of token (0, 0): -A rho' = -1; beta (dk3/dl = 1 - e^0.5 = -0.6487213), and with the correction
        # + k3 rho' = 0.1487213: 0.1 x -0.5 = -0.05; divided by 5 tokens
        expected = (-1 + 0.1 * (-0.6487213 + (0.1487213 if bias else 0.0))) / 5
        assert x.grad[0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_dapo_over_micro_batches_and_processes_is_one_big_batch():
    # 8 completions: 2 processes x 2 accumulation steps x 2 rows. Each micro-batch's share (sum / all 8 rows'
    # tokens) x world size, summed over micro-batches and averaged over processes (DDP), has the gradient of
    # the loss of the 8 rows in one batch: the mean over the step's tokens, not a mean of micro-batch means
    torch.manual_seed(0)
    logps, old, ref = -torch.rand(8, 5) * 3, -torch.rand(8, 5) * 3, -torch.rand(8, 5) * 3
    adv = torch.randn(8)
    mask = torch.arange(5)[None] < torch.tensor([5, 1, 3, 2, 4, 5, 1, 2])[:, None]
    kw = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.04, ref_logps=ref)
    whole = logps.clone().requires_grad_()
    grpo_loss(whole, old, adv, mask, **{**kw, "ref_logps": ref})[0].backward()
    parts, world, n = logps.clone().requires_grad_(), 2, mask.sum().item()
    grads = []
    for p in range(world):
        parts.grad = None
        for rows in (slice(4 * p, 4 * p + 2), slice(4 * p + 2, 4 * p + 4)):
            share, _ = grpo_loss(parts[rows], old[rows], adv[rows], mask[rows], **{**kw, "ref_logps": ref[rows]},
                                 num_items_in_batch=n)
            (share * world).backward()
        grads.append(parts.grad.clone())
    assert torch.allclose(sum(grads) / world, whole.grad, atol=1e-7)
    # while bnpo (a mean per micro-batch, averaged) weighs a short micro-batch's tokens more: not equal
    bn = logps.clone().requires_grad_()
    grpo_loss(bn, old, adv, mask, **{**kw, "loss_type": "bnpo"})[0].backward()
    assert torch.allclose(bn.grad, whole.grad)  # one batch: bnpo = dapo
    split = logps.clone().requires_grad_()
    for rows in (slice(0, 2), slice(2, 8)):
        (grpo_loss(split[rows], old[rows], adv[rows], mask[rows], **{**kw, "loss_type": "bnpo",
                                                                      "ref_logps": ref[rows]})[0] / 2).backward()
    assert not torch.allclose(split.grad, whole.grad)


def test_loss_refuses_unknown_types():
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(LOGPS, OLD, A, MASK, "sapo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(LOGPS, OLD, A, MASK, importance_sampling_level="tokens")
