"""Tier 1: hand-computed values of every loss (the worked numbers of docs/methods.md)."""
import pytest
import torch

from nanorlhf import (bradley_terry_loss, dpo_loss, gae_advantages, nash_md_loss, ppo_clip_loss, rloo_advantages,
                      value_loss, xpo_loss)

RC, RR = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])


def test_bradley_terry_plain():
    # softplus(-1) = 0.3132617, softplus(0.5) = 0.9740770; mean = 0.6436693
    assert bradley_terry_loss(RC, RR).item() == pytest.approx(0.6436693, abs=1e-6)


def test_bradley_terry_margin():
    # diffs - m = [0.5, -0.5]: softplus(-0.5) = 0.4740770, softplus(0.5) = 0.9740770; mean = 0.7240770
    assert bradley_terry_loss(RC, RR, margin=torch.tensor([0.5, 0.0])).item() == pytest.approx(0.7240770, abs=1e-6)


def test_bradley_terry_centering():
    # 0.6436693 + 0.01 * mean([1^2, 1.5^2]) = 0.6436693 + 0.01625 = 0.6599193
    loss = bradley_terry_loss(RC, RR, center_rewards_coefficient=0.01)
    assert loss.item() == pytest.approx(0.6599193, abs=1e-6)


def test_bradley_terry_margin_shape_is_checked():
    # TRL broadcast a (B, 1) margin into (B, B); we refuse it
    with pytest.raises(ValueError, match="margin has shape"):
        bradley_terry_loss(RC, RR, margin=torch.tensor([[0.5], [0.0]]))


def test_rloo_trl_vector():
    # TRL's test: k=4, B=3, A = R - mean of the other three samples of the same prompt
    r = torch.tensor([1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=torch.float)
    expected = torch.tensor([-4, -4, -4, -8 / 3, -8 / 3, -8 / 3, 4 / 3, 4 / 3, 4 / 3, 16 / 3, 16 / 3, 16 / 3])
    torch.testing.assert_close(rloo_advantages(r, 4), expected)


def test_rloo_identities():
    k, B = 3, 5
    r = torch.randn(k * B, generator=torch.Generator().manual_seed(0))
    a = rloo_advantages(r, k)
    torch.testing.assert_close(a.view(k, B).sum(0), torch.zeros(B), atol=1e-6, rtol=0)
    R = r.view(k, B)
    torch.testing.assert_close(a.view(k, B), k / (k - 1) * (R - R.mean(0)))
    naive = torch.tensor([R[j, b] - sum(R[i, b] for i in range(k) if i != j) / (k - 1)
                          for j in range(k) for b in range(B)])
    torch.testing.assert_close(a, naive)
    with pytest.raises(ValueError):
        rloo_advantages(r, 1)


def test_ppo_clip_by_hand():
    # log-ratios [0, ln 1.5, ln 0.5]: rho = [1, 1.5, 0.5]; eps = 0.2; A = [1, 1, -1]
    # row 0: max(-1, -1) = -1; row 1: max(-1.5, -1.2) = -1.2 (clipped); row 2: max(0.5, 0.8) = 0.8 (clipped)
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5]))
    loss, st = ppo_clip_loss(new, old, torch.tensor([1.0, 1.0, -1.0]), 0.2)
    assert loss.item() == pytest.approx((-1 - 1.2 + 0.8) / 3, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)
    assert st["approxkl"].item() == pytest.approx(0.5 * (0.4054651**2 + 0.6931472**2) / 3, abs=1e-6)


def test_ppo_clip_ratio_one_is_reinforce():
    # at rho = 1 the gradient is -A * grad S(l): REINFORCE with the baseline
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([0.5, -0.25])
    loss, _ = ppo_clip_loss(logps, logps.detach(), adv, 0.2)
    loss.backward()
    torch.testing.assert_close(logps.grad, -adv / 2)


def test_ppo_clip_token_level_by_hand():
    # the three rows above as three tokens of one completion, plus a fourth token after EOS (mask False)
    # holding a huge log-ratio and advantage: same loss -0.4667 = (-1 - 1.2 + 0.8) / 3, clipfrac 2/3
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 50.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, st = ppo_clip_loss(new, torch.zeros(1, 4), adv, 0.2, mask)
    assert loss.item() == pytest.approx((-1 - 1.2 + 0.8) / 3, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)
    assert st["ratio"].item() == pytest.approx((1 + 1.5 + 0.5) / 3)


def test_ppo_clip_token_level_masked_mean_over_rows():
    # 2 rows of 3 and 1 real tokens: the mean is over the 4 real tokens, not per row. rho = 1, so L = mean(-A)
    logps = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, st = ppo_clip_loss(logps, logps.detach(), adv, 0.2, mask)
    assert loss.item() == pytest.approx(-(1 + 2 + 3 - 2) / 4)
    loss.backward()
    torch.testing.assert_close(logps.grad, -adv * mask / 4)
    assert st["clipfrac"].item() == 0.0 and st["approxkl"].item() == 0.0


# PPO worked example (docs/methods.md): gamma 1, lam 0.95, V = [0.5, 0.4, 0.6], r = [0.0, -0.1, 1.2]
PPO_V, PPO_R = torch.tensor([[0.5, 0.4, 0.6]]), torch.tensor([[0.0, -0.1, 1.2]])


def test_gae_by_hand():
    # t=2: delta = 1.2 + 0 - 0.6 = 0.6, A = 0.6; t=1: delta = -0.1 + 0.6 - 0.4 = 0.1, A = 0.1 + 0.95 * 0.6 = 0.67;
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1, A = -0.1 + 0.95 * 0.67 = 0.5365; G = A + V = [1.0365, 1.07, 1.2]
    adv, ret = gae_advantages(PPO_R, PPO_V, torch.ones(1, 3, dtype=torch.bool), 1.0, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.5365, 0.67, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0365, 1.07, 1.2]]))


def test_gae_limits():
    torch.manual_seed(0)
    r, v = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 4])[:, None]  # completions of 6, 3, 1 and 4 tokens
    rm, vm = r * mask, v * mask
    # lam = 1, gamma = 1: A_t = sum_{s >= t} r_s - V_t (reward-to-go minus value)
    adv, ret = gae_advantages(r, v, mask, 1.0, 1.0)
    to_go = rm.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (to_go - vm) * mask)
    torch.testing.assert_close(ret, to_go * mask)
    # lam = 0: the one-step TD error r_t + gamma V_{t+1} - V_t, with V = 0 beyond the end
    adv, _ = gae_advantages(r, v, mask, 0.9, 0.0)
    next_v = torch.cat([vm[:, 1:], torch.zeros(4, 1)], 1)
    torch.testing.assert_close(adv, (rm + 0.9 * next_v - vm) * mask)


def test_gae_ignores_values_and_rewards_beyond_the_end():
    mask = torch.tensor([[True, True, False, False]])
    r, v = torch.tensor([[0.1, 1.0, 0.0, 0.0]]), torch.tensor([[0.3, 0.2, 0.0, 0.0]])
    junk = torch.tensor([[0.0, 0.0, 5.0, -7.0]])  # what a value head reads on padding
    a1, g1 = gae_advantages(r, v, mask, 1.0, 0.95)
    a2, g2 = gae_advantages(r + junk, v + junk, mask, 1.0, 0.95)
    assert torch.equal(a1, a2) and torch.equal(g1, g2)
    # by hand: t=1: 1.0 - 0.2 = 0.8; t=0: 0.1 + 0.2 - 0.3 + 0.95 * 0.8 = 0.76
    torch.testing.assert_close(a1, torch.tensor([[0.76, 0.8, 0.0, 0.0]]))


def test_value_loss_by_hand():
    # V_clip = clamp([0.7, 0.3, 0.9], V_old -+ 0.2) = [0.7, 0.3, 0.8]; G = [1.0365, 1.07, 1.2]
    # (V - G)^2 = [0.11323225, 0.5929, 0.09]; (V_clip - G)^2 = [0.11323225, 0.5929, 0.16]
    # L = 0.5 * (0.11323225 + 0.5929 + 0.16) / 3 = 0.144355375; clipped term larger in 1 of 3 tokens
    G = torch.tensor([[1.0365, 1.07, 1.2, 0.0]])
    new, old = torch.tensor([[0.7, 0.3, 0.9, 4.0]]), torch.tensor([[0.5, 0.4, 0.6, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # the fourth position is padding: no part in the loss
    loss, clipfrac = value_loss(new, old, G, mask, 0.2)
    assert loss.item() == pytest.approx(0.144355375, abs=1e-7)
    assert clipfrac.item() == pytest.approx(1 / 3)


# XPO / DPO worked example (docs/methods.md): chosen_mask = [True, False]
LY, LT = torch.tensor([-1.5, -0.9]), torch.tensor([-2.0, -1.0])       # policy on y (policy) and y~ (ref)
RY, RT = torch.tensor([-1.9, -0.8]), torch.tensor([-1.8, -1.1])       # reference on y and y~
CM = torch.tensor([True, False])
C, R = torch.where(CM, LY, LT), torch.where(CM, LT, LY)
RCH, RRJ = torch.where(CM, RY, RT), torch.where(CM, RT, RY)


def test_dpo_sigmoid_and_ipo():
    # z = [0.4 + 0.2, 0.1 + 0.1] = [0.6, 0.2]; mean(log(1+e^-0.06), log(1+e^-0.02)) = 0.67339715
    assert dpo_loss(C, R, RCH, RRJ, beta=0.1).item() == pytest.approx(0.67339715, abs=1e-6)
    # ipo: mean((0.6 - 5)^2, (0.2 - 5)^2) = mean(19.36, 23.04) = 21.2
    assert dpo_loss(C, R, RCH, RRJ, beta=0.1, loss_type="ipo").item() == pytest.approx(21.2, abs=1e-4)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(C, R, RCH, RRJ, beta=0.1, loss_type="hinge")


def test_xpo():
    # dpo part as above + alpha * mean(S(l(y~))) = 1e-5 * -1.5
    loss, parts = xpo_loss(C, R, RCH, RRJ, LT, beta=0.1, alpha=1e-5)
    assert loss.item() == pytest.approx(0.67338215, abs=1e-6)
    assert parts["xpo"].item() == pytest.approx(-1.5e-5, abs=1e-9)
    loss, _ = xpo_loss(C, R, RCH, RRJ, LT, beta=0.1, alpha=1e-5, loss_type="ipo")
    assert loss.item() == pytest.approx(21.199985, abs=1e-4)
    loss0, _ = xpo_loss(C, R, RCH, RRJ, LT, beta=0.1, alpha=0.0)
    assert loss0.item() == dpo_loss(C, R, RCH, RRJ, beta=0.1).item()


def test_nash_md_value_and_gradient():
    l = torch.tensor([[-1.0, -0.5, 0.0], [-0.2, -0.3, -0.4]], requires_grad=True)
    lref = torch.tensor([[-1.2, -0.7, 0.0], [-0.1, -0.5, -0.6]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    p = torch.sigmoid(torch.tensor([1.0, 0.0]) - torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(p, torch.tensor([0.73105858, 0.37754067]))
    loss, st = nash_md_loss(l, lref, mask, p, beta=0.1)
    # row 0: 0.1*(0.2*-1 + 0.2*-0.5) - 0.23105858*-1.5 = 0.31658787
    # row 1: 0.1*(-0.1*-0.2 + 0.2*-0.3 + 0.2*-0.4) - (-0.12245933*-0.9) = -0.12221340; mean 0.09718723
    assert loss.item() == pytest.approx(0.09718723, abs=1e-6)
    (loss * 2).backward()  # dL/dl times B = beta * sg(l - lref) - (P - 1/2), masked
    torch.testing.assert_close(l.grad, torch.tensor([[-0.21105858, -0.21105858, 0.0],
                                                     [0.11245933, 0.14245933, 0.14245933]]))
    assert st["kl"].item() == pytest.approx((0.4 + 0.3) / 2, abs=1e-6)
