"""Tensor helpers: log-probabilities, masks, entropy, KL estimators.

Shapes: B sequences, T completion positions, V vocabulary. Masks are boolean, True = real token.
"""
import inspect

import torch
import torch.nn.functional as F
import transformers
from torch.distributed.fsdp import FSDPModule

# the KV cache's name in a model's arguments and outputs: `cache` since transformers 5.24 (`past_key_values` there
# warns, and goes in 5.40), `past_key_values` before; read from the installed library, so both versions run clean
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"

CHUNK_ELEMENTS = 2**26  # elements of one (rows, V) chunk: 256 MB in float32


def _rows(x):  # rows per chunk: at most CHUNK_ELEMENTS elements of (N, V)
    return max(1, CHUNK_ELEMENTS // x.shape[-1])


def _chunks(x, index=None):
    """Flatten (..., V) to (N, V) rows and split them into chunks of at most _rows(x) rows."""
    rows = x.reshape(-1, x.shape[-1]).split(_rows(x))
    return rows if index is None else zip(rows, index.reshape(-1).split(_rows(x)))


def _up(z):  # float32 for half precision (bf16 log_softmax loses ~1e-2), float64 kept
    return z if z.dtype == torch.float64 else z.float()


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(z / t)[index] chunk by chunk; backward recomputes each chunk's softmax, so what is saved
    for backward is the logits themselves (already alive) plus one logsumexp per row, never a (N, V) copy."""

    @staticmethod
    def forward(ctx, logits, index, temperature):
        out, lse = [], []
        for z, idx in _chunks(logits, index):
            z = _up(z) / temperature
            lse.append(torch.logsumexp(z, dim=-1))
            out.append(z.gather(-1, idx[:, None]).squeeze(-1) - lse[-1])
        ctx.save_for_backward(logits, index, torch.cat(lse))
        ctx.temperature = temperature
        return torch.cat(out).view(index.shape)

    @staticmethod
    def backward(ctx, grad_out):
        # d/dz_v [z_i / t - logsumexp(z / t)] = (onehot_i(v) - softmax(z / t)_v) / t, one chunk at a time
        logits, index, lse = ctx.saved_tensors
        V, n = logits.shape[-1], _rows(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        parts = (logits.reshape(-1, V), index.reshape(-1), grad.view(-1, V), lse, grad_out.reshape(-1))
        for z, idx, out, lse_c, g in zip(*(p.split(n) for p in parts)):
            d = -torch.exp(_up(z) / ctx.temperature - lse_c[:, None])  # -softmax, (n, V)
            d.scatter_add_(-1, idx[:, None], torch.ones_like(d[:, :1]))
            out.copy_(d * (g[:, None] / ctx.temperature))
        return grad, None, None


def selective_log_softmax(logits, index, temperature=1.0):
    """log_softmax(logits / temperature) gathered at index: (..., V), (...) -> (...), float32 (float64 stays).

    Computed as z[index] - logsumexp(z) chunk by chunk over rows, and differentiated chunk by chunk
    (a custom backward recomputes each chunk's softmax), so neither the forward nor the memory saved for
    backward ever holds a full (B, T, V) float32 log-softmax: the saved state is the logits plus one
    logsumexp per row. bf16/fp16 logits are upcast one chunk at a time.
    """
    return _SelectiveLogSoftmax.apply(logits, index, float(temperature))


def entropy_from_logits(logits, temperature=1.0):
    """H = logsumexp(z) - sum_v softmax(z)_v z_v with z = logits / temperature: (..., V) -> (...)."""
    out = []
    for z in _chunks(logits):
        z = z.float() / temperature
        out.append(torch.logsumexp(z, -1) - (F.softmax(z, -1) * z).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def position_ids_from_mask(attention_mask):
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shares_prompts(prompt_ids, prompt_mask):
    """Whether some rows hold the same (left-padded) prompt."""
    return len(torch.unique(torch.cat([prompt_ids, prompt_mask.long()], 1), dim=0)) < len(prompt_ids)


def prompt_forward(model, prompt_ids, prompt_mask, **kwargs):
    """(logits, KV cache) of model on left-padded prompts (B, P), each distinct prompt run once and expanded to
    every row that holds it (RLOO's k samples, y and y' of the online methods): an index_select of the logits
    and of the cache, through which gradients add up over the copies. Rows that all differ run as they are."""
    uniq, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask.long()], 1), dim=0, return_inverse=True)
    shared = len(uniq) < len(prompt_ids)
    ids, mask = uniq.split(prompt_ids.shape[1], dim=1) if shared else (prompt_ids, prompt_mask.long())
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                **kwargs)
    if not shared:
        return out.logits, getattr(out, CACHE)
    getattr(out, CACHE).reorder_cache(inverse)
    return out.logits[inverse], getattr(out, CACHE)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, temperature=1.0, with_entropy=False):
    """Per-token log pi(y_t | x, y_<t) (B, T) at `temperature` of a causal LM, completion positions only.

    prompt_ids/prompt_mask (B, P) left-padded, completion_ids (B, T). The logits predicting y_t sit at
    P-1 .. P+T-2: only those are computed. When rows share prompts, each prompt is run once with a KV cache
    (`prompt_forward`) and the completions on top of it, the numbers of one forward of the concatenation at
    the cost of one prompt (off under gradient checkpointing, where HF turns the cache off in training).
    With with_entropy, also the (B, T) entropy. The caller masks positions after EOS.
    """
    T, base = completion_ids.shape[1], getattr(model, "module", model)
    mask = torch.cat([prompt_mask.bool(), torch.ones_like(completion_ids, dtype=torch.bool)], dim=1)
    checkpointing = base.training and any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    # FSDP2: every forward all-gathers, so every rank takes the cached path, whether or not its rows share prompts
    if (shares_prompts(prompt_ids, prompt_mask) or isinstance(model, FSDPModule)) and not checkpointing:
        logits, cache = prompt_forward(model, prompt_ids, prompt_mask, logits_to_keep=1)  # predicts y_1
        if T > 1:
            logits = torch.cat([logits, model(
                input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1].long(), **{CACHE: cache},
                position_ids=position_ids_from_mask(mask)[:, prompt_ids.shape[1]:-1], use_cache=True).logits], 1)
    else:
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask),
                       logits_to_keep=T + 1, use_cache=False).logits[:, -T - 1:-1]  # (B, T, V)
    logps = selective_log_softmax(logits, completion_ids, temperature)
    if with_entropy:
        with torch.no_grad():
            return logps, entropy_from_logits(logits, temperature)
    return logps


def truncate_at_eos(tokens, eos_token_id, pad_token_id):
    """(tokens with pad after the first EOS, mask (B, T) bool up to and including it); eos: int or list."""
    eos = torch.isin(tokens, torch.as_tensor(eos_token_id, device=tokens.device).reshape(-1))
    seen_before = (eos.long().cumsum(-1) - eos.long()) > 0  # (B, T) an EOS strictly earlier
    mask = ~seen_before
    return tokens.masked_fill(~mask, pad_token_id), mask


def contains_eos(tokens, mask, eos_token_id):
    """(B,) bool: the completion (mask True) holds an EOS; not the prompt, whose template has EOS tokens."""
    return (torch.isin(tokens, torch.as_tensor(eos_token_id, device=tokens.device).reshape(-1)) & mask.bool()).any(1)


def masked_mean(x, mask, dim=None):
    """sum(mask * x) / sum(mask), over `dim` (all elements when None)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_estimators(logps, ref_logps, mask):
    """Per-token KL(pi || ref) estimators on r = log pi - log ref for samples y ~ pi (Schulman 2020).

    k1 = r (unbiased, high variance), k2 = r^2 / 2, k3 = exp(-r) - 1 + r (unbiased, >= 0).
    All (B, T), zero where mask is False.
    """
    r = (logps - ref_logps) * mask
    return {"k1": r, "k2": 0.5 * r**2, "k3": (torch.expm1(-r) + r) * mask}
