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


def nanstd(x, dim=None):
    """Sample standard deviation (ddof 1) ignoring NaN; NaN where fewer than 2 values (TRL's nanstd)."""
    n = (~x.isnan()).sum(dim)
    var = ((x - x.nanmean(dim, keepdim=dim is not None)) ** 2).nansum(dim) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.nan)


def grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """GRPO advantages of rewards (G*B,) in [G, B] layout (row j*B + b = sample j of prompt b, G = num_generations):
    A = (r - mean of the prompt's group) / (std + 1e-4), std the group's sample std ("group"), the whole batch's
    ("batch"), or no division ("none": Dr. GRPO). NaN rewards (unscorable) stay out of means and stds and get A = 0,
    as TRL's. Returns (advantages (G*B,), std (G*B,): the std each row was divided by; "none": its group's)."""
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards {scale_rewards!r}: use group, batch or none")
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(f"grpo_advantages needs num_generations >= 2 dividing {rewards.numel()} rewards")
    R = rewards.view(num_generations, -1)  # (G, B)
    std = nanstd(R).expand_as(R) if scale_rewards == "batch" else nanstd(R, 0).expand_as(R)
    adv = R - R.nanmean(0)
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return adv.nan_to_num(0.0).reshape(-1), std.reshape(-1)


def grpo_loss(logps, old_logps, advantages, mask, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
              ref_logps=None, importance_sampling_level="token", max_completion_length=None,
              use_bias_correction_kl=True, num_items_in_batch=None):
    """GRPO's clipped objective (TRL 1.16's `_compute_loss`) on per-token (B, T) log-probs, advantages (B,), mask
    (B, T) bool. rho = exp(l - l_old) per token, or per sequence ("sequence", GSPO: exp of the mean log-ratio);
    loss_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), or "cispo": -sg(min(rho, eps_high)) A l_t; plus
    beta k3 = beta (exp(lref - l) - (lref - l) - 1), times rho with use_bias_correction_kl. Aggregated by loss_type:
    "grpo" mean over each completion's tokens, then over completions; "bnpo" mean over the batch's tokens; "dr_grpo"
    sum / (B x max_completion_length); "dapo" and "cispo" sum / num_items_in_batch, the completion tokens of the
    whole optimizer step (all micro-batches and processes): this batch's share, so shares add up to the step's loss.
    Returns (loss, stats {name: (sum, count)}: k3 kl, clip_ratio/low_mean, /high_mean, /region_mean or
    cispo_clip_ratio; counted over tokens, or over completions at sequence level)."""
    m, seq = mask.bool(), importance_sampling_level == "sequence"
    log_ratio = torch.where(m, logps - old_logps, 0.0)
    if seq:
        log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)  # (B, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level {importance_sampling_level!r}: use token or sequence")
    ratio, A = torch.exp(log_ratio), advantages.unsqueeze(-1)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * A * logps
    else:
        per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
    stats = {}
    if beta:
        d = torch.where(m, ref_logps - logps, 0.0)
        kl = (torch.exp(d) - d - 1) * (ratio if use_bias_correction_kl else 1.0)
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * m).sum().detach(), m.sum())
    total = (per_token * m).sum()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = total / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = total / (len(logps) * max_completion_length)
    elif loss_type in ("dapo", "cispo"):
        loss = total / max(num_items_in_batch if num_items_in_batch is not None else m.sum().item(), 1)
    else:
        raise ValueError(f"loss_type {loss_type!r}: use grpo, bnpo, dr_grpo, dapo or cispo")
    n, w = (torch.tensor(len(ratio)), 1.0) if seq else (m.sum(), m)  # per completion, or per (real) token
    if loss_type == "cispo":
        stats["cispo_clip_ratio"] = ((((ratio > epsilon_high) & (A > 0)) * w).sum(), n)
    else:
        low, high = (ratio < 1 - epsilon_low) & (A < 0), (ratio > 1 + epsilon_high) & (A > 0)
        for name, x in (("low_mean", low), ("high_mean", high), ("region_mean", low | high)):
            stats[f"clip_ratio/{name}"] = ((x * w).sum(), n)
    return loss, stats
