"""Batched autoregressive sampling from HF causal LMs with a KV cache, and the Nash-MD mixture.

Randomness is drawn per row from a generator seeded by (seed, global prompt index, sample index),
and a token is picked by inverse-CDF with one uniform per (row, step). So a row's completion does
not depend on the batch it lands in or on the number of processes.
"""
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ops import position_ids_from_mask, truncate_at_eos


def rollout_seeds(seed, prompt_indices, sample_index=0):
    """One 63-bit seed per row: a hash of (seed, global prompt index, sample index)."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{int(p)}:{sample_index}".encode(), digest_size=8).digest(),
                           "little") >> 1 for p in prompt_indices]


def _filter(probs, top_k, top_p):
    """Zero all but the top_k most likely tokens, then all outside the top_p nucleus. (B, V)."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        before = p.cumsum(-1) - p  # mass of strictly more likely tokens
        p = p.masked_fill(before >= top_p * p.sum(-1, keepdim=True), 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    return probs


def _pick(logits, u, temperature, top_k, top_p):
    """Next token from (B, V) logits given uniforms u (B,): argmax at temperature 0, else inverse CDF."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filter(F.softmax(logits.double() / temperature, dim=-1), top_k, top_p)
    cdf = probs.cumsum(-1)  # (B, V); zero-probability tokens are never picked with right=True
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tok.clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def _generate(models, weights, prompt_ids, prompt_mask, *, max_new_tokens, eos_token_id, pad_token_id, seeds,
              temperature=1.0, top_k=0, top_p=1.0, use_cache=True, sync=False):
    B, device = prompt_ids.shape[0], prompt_ids.device
    if len(seeds) != B:
        raise ValueError(f"need one seed per prompt row: {len(seeds)} seeds for {B} rows")
    u = torch.stack([torch.rand(max_new_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                     for s in seeds]).to(device)  # (B, max_new_tokens)
    eos = torch.as_tensor(eos_token_id, device=device).reshape(-1)
    modes = [m.training for m in models]
    for m in models:  # eval: HF turns the KV cache off under gradient checkpointing in train mode
        m.eval()
    ids, mask, new = prompt_ids, prompt_mask.long(), prompt_ids
    caches, tokens, logps = [None] * len(models), [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        pos = position_ids_from_mask(mask)
        z = 0.0
        for i, (m, w) in enumerate(zip(models, weights)):
            if use_cache:
                out = m(input_ids=new, attention_mask=mask, position_ids=pos[:, -new.shape[1]:],
                        past_key_values=caches[i], use_cache=True, logits_to_keep=1)  # prefill: last position only
                caches[i] = out.past_key_values
            else:  # full recompute of the prefix (what TRL's Nash-MD mixture sampler did), for reference
                out = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
            z = z + w * out.logits[:, -1].float()  # (B, V)
        tok = _pick(z, u[:, t], temperature, top_k, top_p).masked_fill(done, pad_token_id)
        logps.append(F.log_softmax(z / (temperature or 1.0), dim=-1).gather(-1, tok[:, None]).squeeze(-1))
        tokens.append(tok)
        done = done | torch.isin(tok, eos)
        new = tok[:, None]
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        stop = done.all().to(torch.int32)
        if sync:  # sharded (FSDP) models: every rank must run the same number of forwards
            dist.all_reduce(stop, op=dist.ReduceOp.MIN)
        if stop.item():
            break
    for m, mode in zip(models, modes):
        m.train(mode)
    tokens, comp_mask = truncate_at_eos(torch.stack(tokens, 1), eos, pad_token_id)
    return tokens, comp_mask, torch.stack(logps, 1).masked_fill(~comp_mask, 0.0)


def generate(model, prompt_ids, prompt_mask, *, max_new_tokens, eos_token_id, pad_token_id, seeds,
             temperature=1.0, top_k=0, top_p=1.0, use_cache=True, sync=False):
    """Sample y ~ pi(. | x) for left-padded prompts (B, P): z = logits / temperature, top_k / top_p, an
    inverse-CDF draw with the row's uniform; rows stop at their first EOS (int or list), the loop when all
    have (sync=True agrees on that across ranks: needed for FSDP-sharded models). Temperature 0 = greedy.
    Returns tokens (B, T) with pad after EOS, mask (B, T) bool including the EOS, and the sampling
    log-probs log_softmax(z)[y_t] (B, T), before top-k/top-p filtering, 0 where masked."""
    return _generate([model], [1.0], prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, seeds=seeds,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature, top_k=top_k,
                     top_p=top_p, use_cache=use_cache, sync=sync)


def generate_mixture(model, ref_model, mixture_coef, prompt_ids, prompt_mask, **kwargs):
    """Sample y' from the geometric mixture pi_mix ∝ pi_ref^alpha pi_theta^(1 - alpha), token by token.

    Next-token logits alpha * z_ref + (1 - alpha) * z_theta (then temperature), each model with its
    own KV cache, so y' costs two ordinary generations. Same keywords and returns as `generate`,
    log-probs under the mixture.
    """
    if not 0.0 <= mixture_coef <= 1.0:
        raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
    return _generate([ref_model, model], [mixture_coef, 1.0 - mixture_coef], prompt_ids, prompt_mask, **kwargs)
