"""The five methods' objectives as pure functions (equations and worked numbers: docs/methods.md).

Sequence-level inputs are (B,) masked sums S(l) = sum_t mask_t l_t; Nash-MD and PPO take per-token (B, T).
"""
import torch
import torch.nn.functional as F

from .ops import masked_mean


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=None):
    """L = mean softplus(-(r_c - r_r - m)) + c * mean (r_c + r_r)^2, all inputs (B,); softplus(-x) = -logsigmoid(x).
    The margin keeps shape (B,): TRL v0.13-v0.23 broadcast a (B, 1) margin into a (B, B) matrix."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin has shape {tuple(margin.shape)}, rewards have {tuple(diff.shape)}")
        diff = diff - margin
    loss = F.softplus(-diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def rloo_advantages(rewards, k):
    """Leave-one-out advantages (k*B,) of rewards (k*B,) in [k, B] layout (row j*B + b = sample j of prompt b):
    A_jb = R_jb - (sum_i R_ib - R_jb) / (k - 1) = k/(k-1) * (R_jb - mean_i R_ib)."""
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"rloo_advantages needs k >= 2 dividing {rewards.numel()} rewards, got k={k}")
    R = rewards.view(k, -1)  # (k, B)
    return (R - (R.sum(0, keepdim=True) - R) / (k - 1)).reshape(-1)


def ppo_clip_loss(logps, old_logps, advantages, cliprange, mask=None):
    """PPO clipped surrogate L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).
    Sequence level (RLOO, mask None): inputs (B,) masked sums, rho = exp(S(l_new) - S(l_old)), mean over B.
    Token level (PPO): inputs (B, T) per token with mask (B, T) bool, rho_t = exp(l_t - l_old,t), mean over the
    masked tokens (positions after EOS take no part, whatever they hold). Returns (loss, stats): clipfrac =
    mean[clipped term larger], approxkl = mean (log rho)^2 / 2, ratio = mean rho, means as the loss's."""
    mean = torch.mean if mask is None else (lambda x: masked_mean(x, mask))
    log_ratio = logps - old_logps if mask is None else torch.where(mask.bool(), logps - old_logps, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = mean(torch.max(unclipped, clipped))
    with torch.no_grad():
        stats = {"clipfrac": mean((clipped > unclipped).float()), "approxkl": 0.5 * mean(log_ratio**2),
                 "ratio": mean(ratio)}
    return loss, stats


def gae_advantages(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016) backwards over each completion, all (B, T):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with r and V taken as 0 beyond the
    completion's end (mask False), so whatever a value head reads on padding never reaches A.
    Returns (advantages, returns G = A + V), both 0 beyond the end."""
    r, v = rewards * mask, values * mask
    adv, running = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_v = v[:, t + 1] if t + 1 < r.shape[1] else 0.0
        running = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * running  # delta_t + gamma lam A_{t+1}
        adv[:, t] = running
    adv = adv * mask
    return adv, adv + v


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss of PPO's value head, all (B, T): V_clip = clamp(V, V_old - c, V_old + c),
    L = 1/2 masked_mean max((V - G)^2, (V_clip - G)^2). Returns (loss, clipfrac = masked_mean[clipped
    term larger])."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def _dpo_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type):
    """Per-pair DPO loss with z = [S(l_c) - S(lref_c)] - [S(l_r) - S(lref_r)]: (B,)."""
    z = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * z)
    if loss_type == "ipo":  # Azar et al. 2023, eq. 17: regress z onto 1 / (2 beta)
        return (z - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type="sigmoid"):
    """DPO (Rafailov et al. 2023): mean -logsigmoid(beta z) ("sigmoid") or mean (z - 1/(2 beta))^2 ("ipo")."""
    return _dpo_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type).mean()


def xpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, ref_sample_logps, beta,
             alpha, loss_type="sigmoid"):
    """XPO (Xie et al. 2024, Alg. 1): L = mean_b [dpo_b + alpha * S(l(y~_b))], ref_sample_logps (B,) being
    the policy's summed log-prob of the reference sample y~ (plus sign: minimizing lowers the policy's
    likelihood of reference samples). Returns (loss, {"dpo": mean dpo part, "xpo": mean bonus part})."""
    dpo = _dpo_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type)
    xpo = alpha * ref_sample_logps
    return (dpo + xpo).mean(), {"dpo": dpo.mean().detach(), "xpo": xpo.mean().detach()}


def nash_md_loss(logps, ref_logps, mask, probabilities, beta):
    """Nash-MD-PG (Munos et al. 2023, the form TRL shipped) on per-token (B, T) inputs, mask bool:
    L = mean_b [beta sum_t sg(l_t - lref_t) l_t - (P_b - 1/2) S(l)], P_b = P(y_b beats y'_b), gradient only
    through l (the policy sample). Returns (loss, {"kl": mean S(l - lref), "score": mean (P - 1/2) S(l)})."""
    log_ratio = ((logps - ref_logps) * mask).detach()
    kl_term = (log_ratio * logps * mask).sum(-1)  # (B,)
    score = (probabilities - 0.5) * (logps * mask).sum(-1)  # (B,)
    loss = (beta * kl_term - score).mean()
    return loss, {"kl": log_ratio.sum(-1).mean(), "score": score.mean().detach()}
