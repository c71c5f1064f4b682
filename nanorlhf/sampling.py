"""Batched autoregressive sampling from HF causal LMs with a KV cache, and the Nash-MD mixture.

Randomness is drawn per row from a generator seeded by (seed, global prompt index, sample index),
and a token is picked by inverse-CDF with one uniform per (row, step). So a row's completion does
not depend on the batch it lands in or on the number of processes.
"""
import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from .data import pad
from .dist import all_reduce_metrics, is_main
from .ops import CACHE, completion_logprobs, position_ids_from_mask, prompt_forward, truncate_at_eos


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
    """z = sum_i w_i * logits_i per row; a weight is a float or one value per row (B,), and a model runs only on
    the rows where its weight is not 0 (each model keeps a KV cache of its own rows), until they have all stopped."""
    B, device = prompt_ids.shape[0], prompt_ids.device
    if len(seeds) != B:
        raise ValueError(f"need one seed per prompt row: {len(seeds)} seeds for {B} rows")
    u = torch.stack([torch.rand(max_new_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                     for s in seeds]).to(device)  # (B, max_new_tokens)
    eos = torch.as_tensor(eos_token_id, device=device).reshape(-1)
    weights = [torch.as_tensor(w, dtype=torch.float64).expand(B) for w in weights]
    rows = [slice(None) if (w != 0).all() else (w != 0).nonzero().squeeze(1).to(device) for w in weights]
    weights = [w.to(device, torch.float32)[:, None] for w in weights]  # float32(w) multiplies, as a float would
    modes = [m.training for m in models]
    for m in models:  # eval: HF turns the KV cache off under gradient checkpointing in train mode
        m.eval()
    ids, mask, new = prompt_ids, prompt_mask.long(), prompt_ids
    caches, tokens, logps = [None] * len(models), [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    active = [isinstance(r, slice) or len(r) > 0 for r in rows]
    every = 8 if device.type == "cuda" else 1  # asking is a host sync: on a GPU, every 8 tokens, not every token
    for t in range(max_new_tokens):
        pos = position_ids_from_mask(mask)
        z = 0.0
        for i, (m, w, r) in enumerate(zip(models, weights, rows)):
            if not active[i]:  # no rows, or all its rows have stopped
                continue
            if use_cache and caches[i] is None:  # prefill, each distinct prompt once (a row's k samples share it)
                zi, caches[i] = prompt_forward(m, new[r], mask[r], logits_to_keep=1)
            elif use_cache:
                out = m(input_ids=new[r], attention_mask=mask[r], position_ids=pos[r, -new.shape[1]:],
                        use_cache=True, logits_to_keep=1, **{CACHE: caches[i]})
                zi, caches[i] = out.logits, getattr(out, CACHE)
            else:  # full recompute of the prefix (what TRL's Nash-MD mixture sampler did), for reference
                zi = m(input_ids=ids[r], attention_mask=mask[r], position_ids=pos[r], use_cache=False,
                       logits_to_keep=1).logits
            zi = zi[:, -1].float()
            if not isinstance(r, slice):  # back to all B rows, 0 on the others
                zi = torch.zeros(B, zi.shape[-1], device=device).index_copy(0, r, zi)
            z = z + w * zi  # (B, V); 0 + x and x + 0 are exact, so a row's z is as if its models ran alone
        tok = _pick(z, u[:, t], temperature, top_k, top_p).masked_fill(done, pad_token_id)
        logps.append(F.log_softmax(z / (temperature or 1.0), dim=-1).gather(-1, tok[:, None]).squeeze(-1))
        tokens.append(tok)
        done = done | torch.isin(tok, eos)
        new = tok[:, None]
        ids, mask = torch.cat([ids, new], 1) if not use_cache else ids, torch.cat([mask, torch.ones_like(new)], 1)
        if (t + 1) % every == 0:  # which models' rows are all done, and all rows?
            stop = torch.stack([done[r].all() for r in rows] + [done.all()]).to(torch.int32)
            if sync:  # sharded (FSDP) models: every rank must run the same number of forwards
                dist.all_reduce(stop, op=dist.ReduceOp.MIN)
            stop = stop.tolist()
            if stop[-1]:
                break
            active = [a and not s for a, s in zip(active, stop)]
    for m, mode in zip(models, modes):
        m.train(mode)
    tokens, comp_mask = truncate_at_eos(torch.stack(tokens, 1), eos, pad_token_id)
    T = int(comp_mask.sum(1).max())  # columns after every row's EOS (up to 7 pad tokens of extra steps) dropped
    return tokens[:, :T], comp_mask[:, :T], torch.stack(logps, 1)[:, :T].masked_fill(~comp_mask[:, :T], 0.0)


def generate(model, prompt_ids, prompt_mask, **kwargs):
    """Sample y ~ pi(. | x) for left-padded prompts (B, P): z = logits / temperature, top_k / top_p, an
    inverse-CDF draw with the row's uniform. Keywords: max_new_tokens, eos_token_id (int or list), pad_token_id,
    seeds (one per row), temperature=1.0 (0 = greedy), top_k=0, top_p=1.0, use_cache=True, sync=False. Rows
    stop at their first EOS, the loop when all have (checked every 8 tokens on a GPU; sync=True agrees across
    ranks, as FSDP-sharded models need). Returns tokens (B, T) with pad after EOS, mask (B, T) bool including
    the EOS, and the sampling log-probs log_softmax(z)[y_t] (B, T), before top-k/top-p filtering, 0 where masked."""
    return _generate([model], [1.0], prompt_ids, prompt_mask, **kwargs)


def generate_mixture(model, ref_model, mixture_coef, prompt_ids, prompt_mask, **kwargs):
    """Sample y' from the geometric mixture pi_mix ∝ pi_ref^alpha pi_theta^(1 - alpha), token by token.

    Next-token logits alpha * z_ref + (1 - alpha) * z_theta (then temperature), each model with its own KV
    cache. alpha (mixture_coef) is a float or one per row: rows with alpha 0 are samples of the policy alone
    (the reference skips them), so y and y' come from one call with one policy forward per token. Same
    keywords and returns as `generate`, log-probs under each row's mixture.
    """
    alpha = torch.as_tensor(mixture_coef, dtype=torch.float64)
    if not bool(((alpha >= 0) & (alpha <= 1)).all()):
        raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
    return _generate([ref_model, model], [alpha, 1.0 - alpha], prompt_ids, prompt_mask, **kwargs)


class Rollouts:
    """One script's sampling in one place: sample completions of prompt id lists, their log-probs under a
    model, and the held-out evaluation. `model` is the policy as it samples: the bare module under DDP, the
    FSDP2 module under --fsdp, whose blocks are then gathered once per call and resharded after (one
    all-gather per block per rollout, not per token), or with sharded=True all-gathered at every token
    (for a model that does not fit unsharded). Calls run in chunks of batch_size rows, under bf16 autocast
    when bf16 (GPU)."""

    def __init__(self, model, tokenizer, *, device, batch_size, max_new_tokens, temperature, eos_token_id,
                 bf16=False, sharded=False):
        self.model, self.tokenizer, self.device, self.n, self.bf16 = model, tokenizer, device, batch_size, bf16
        fsdp, self.temperature = isinstance(model, FSDPModule), temperature
        self.gather = fsdp and not sharded  # unshard the blocks once per sample() call
        self.kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, temperature=temperature,
                       pad_token_id=tokenizer.pad_token_id, sync=fsdp and sharded)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def sample(self, rows, seeds, ref=None, mixture_coef=0.0):
        """(prompt ids, prompt mask, tokens, completion mask) of prompt id lists, tokens padded to the longest.
        With ref, each row samples from the mixture with mixture_coef, a float or one per row: 0 = the policy,
        1 = the reference alone, so the samples of both models come from one call."""
        ids, mask = (t.to(self.device) for t in pad(rows, self.tokenizer.pad_token_id))
        alpha, blocks = torch.as_tensor(mixture_coef, dtype=torch.float64).expand(len(rows)), []
        if self.gather:  # the policy's blocks, and a sharded reference's (the mixture), gathered once per rollout
            blocks = [m for root in (self.model, ref) if root is not None for m in root.modules()
                      if isinstance(m, FSDPModule) and m is not root]
        for m in blocks:  # (the root stays unsharded after its forward anyway)
            m.set_reshard_after_forward(False, recurse=False)
        outs = []
        try:
            for i in range(0, len(rows), self.n):
                s = slice(i, i + self.n)
                with self.autocast():
                    outs.append((generate(self.model, ids[s], mask[s], seeds=seeds[s], **self.kw) if ref is None else
                                 generate_mixture(self.model, ref, alpha[s], ids[s], mask[s], seeds=seeds[s],
                                                  **self.kw))[:2])
        finally:
            for m in blocks:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)
        T, pad_id = max(o[0].shape[1] for o in outs), self.tokenizer.pad_token_id
        tokens = torch.cat([F.pad(o[0], (0, T - o[0].shape[1]), value=pad_id) for o in outs])
        return ids, mask, tokens, torch.cat([F.pad(o[1], (0, T - o[1].shape[1])) for o in outs])

    @torch.no_grad()
    def logprobs(self, model, ids, mask, tokens, cmask, chunks=None):
        """Per-token log-probs at the sampling temperature, float32, 0 after EOS: (B, T). chunks: the row indices
        run together (default: runs of batch_size rows); an update's own micro-batches give the update's numbers
        exactly (under bf16 other chunks round otherwise)."""
        lp = torch.zeros(tokens.shape, device=tokens.device)
        with self.autocast():
            for rows in torch.arange(len(ids)).split(self.n) if chunks is None else chunks:
                lp[rows] = completion_logprobs(model, ids[rows], mask[rows], tokens[rows], self.temperature).float()
        return lp * cmask

    @torch.no_grad()
    def evaluate(self, step, ref, scorer, prompts, prompt_ids, *, seed, tracker, gold_reward=None):
        """Held-out prompts sampled the same way each time (seeds fixed), split over ranks (padding rows keep
        every rank's forwards equal, weight 0): eval/ reward (when a scorer), kl (summed k1 to ref, when one),
        length and gold_reward (gold_reward(prompt texts, completion texts)); 4 samples to samples.jsonl and the
        screen."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = list(range(rank, len(prompt_ids), world))
        weight = torch.tensor([1.0] * len(mine) + [0.0] * (math.ceil(len(prompt_ids) / world) - len(mine)),
                              device=self.device)
        mine += [0] * (len(weight) - len(mine))
        ids, mask, tokens, cmask = self.sample([prompt_ids[i] for i in mine], rollout_seeds(seed, mine, -1))
        sums, kl = {"n": weight.sum(), "length": cmask.sum(1).float() @ weight}, torch.full((len(mine),), math.nan)
        if ref is not None:  # (GRPO with beta 0 loads no reference)
            kl = (self.logprobs(self.model, ids, mask, tokens, cmask) - self.logprobs(ref, ids, mask, tokens, cmask))
            kl = kl.sum(1)
            sums["kl"] = kl @ weight
        s = torch.zeros(len(mine), device=self.device)
        if scorer is not None:
            s, p_texts, texts = scorer([prompts[i] for i in mine], ids, mask, tokens, cmask)
            sums["reward"] = s @ weight
        else:
            p_texts, texts = (self.tokenizer.batch_decode(t, skip_special_tokens=True) for t in (ids, tokens))
        if gold_reward is not None:
            sums["gold_reward"] = torch.tensor(gold_reward(p_texts, texts), device=self.device) @ weight
        r = all_reduce_metrics({k: v.item() for k, v in sums.items()}, op="sum")
        table = [{"step": step, "prompt": p, "completion": c, "score": round(x, 4),
                  "kl": round(k, 4) if ref is not None else None}
                 for p, c, x, k in zip(p_texts[:4], texts[:4], s.tolist(), kl.tolist())]
        tracker.table(table)  # samples.jsonl and the trackers' tables
        for row in table if is_main() else []:
            tqdm.write(f"  {row['prompt'][-60:]!r} -> {row['completion'][:80]!r}  score {row['score']}  kl {row['kl']}")
        return {f"eval/{k}": v / r["n"] for k, v in r.items() if k != "n"}
