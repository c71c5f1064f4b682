"""Scoring completions: a sequence-classification reward model, or a Python function on texts."""
import importlib
import math

import torch

from .data import encode, pad
from .ops import position_ids_from_mask


def last_token_index(attention_mask):
    """Index of the last real token of each row, from the mask (left or right padding): (B, L) -> (B,)."""
    L = attention_mask.shape[-1]
    return L - 1 - attention_mask.long().flip(-1).argmax(-1)


def reward_model_scores(reward_model, input_ids, attention_mask):
    """Scalar reward per sequence (B,), read at the last real token found from the attention mask.

    Decoder heads (`.score`: Llama, Qwen2, GPT-2) give per-token logits that HF pools at the last
    token != pad_token_id, which is wrong when pad == eos and the sequence ends in EOS. We take the
    per-token logits with a forward hook (the call still goes through the wrapped model, so DDP and
    FSDP hooks run) and gather at the last real token; positions skip left padding. Encoder heads
    (BERT-style) pool the first token themselves, so their logits are used as they are.
    """
    model = getattr(reward_model, "module", reward_model)  # DDP
    if model.config.num_labels != 1:
        raise ValueError(f"a reward model needs num_labels=1, this one has {model.config.num_labels}")
    head = getattr(model, "score", None)
    if head is None:
        return reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    captured = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        reward_model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        hook.remove()
    logits = captured[0][..., 0]  # (B, L)
    return logits.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1).float()


def score_completions(reward_model, rm_tokenizer, prompts, completions, batch_size=None, device=None):
    """Reward-model scores (B,) of decoded completions, re-encoded with the reward model's tokenizer.

    Used when the reward model's tokenizer differs from the policy's (the policy's token ids mean
    nothing to it): prompt (string or messages) + completion text are encoded again exactly as
    train_reward.py encodes its pairs (`data.encode`, chat template when the prompt is messages),
    and right-padded.
    """
    seqs = []
    for p, c in zip(prompts, completions):
        p_ids, c_ids = encode(rm_tokenizer, p, c if isinstance(p, str) else [{"role": "assistant", "content": c}])
        seqs.append(p_ids + c_ids)
    out, n = [], batch_size or len(seqs)
    for i in range(0, len(seqs), n):
        ids, mask = pad(seqs[i:i + n], rm_tokenizer.pad_token_id, side="right")
        out.append(reward_model_scores(reward_model, ids.to(device), mask.to(device)))
    return torch.cat(out)


def load_function(spec):
    """'package.module:function' -> the function (for --reward_fn / --preference_fn)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{spec}: {module} has no function {name!r}")
    return fn


def call_reward_fn(fn, prompts, completions, *more, low=-math.inf, high=math.inf):
    """fn(prompts, completions, *more) -> one finite float per completion in [low, high], else ValueError
    naming the sample (a preference function gets a second completion list). Returns a float32 tensor (B,)."""
    values = fn(prompts, completions, *more)
    values = values.tolist() if torch.is_tensor(values) else list(values)
    if len(values) != len(completions):
        raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(values)} values for "
                         f"{len(completions)} completions")
    for i, v in enumerate(values):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and low <= v <= high):
            raise ValueError(f"{getattr(fn, '__name__', fn)} returned {v!r} for sample {i} (must be a finite "
                             f"number in [{low}, {high}]); completion: {completions[i]!r:.120}")
    return torch.tensor(values, dtype=torch.float32)
