"""Scoring completions: a sequence-classification reward model, or a Python function on texts."""
import copy
import importlib
import inspect
import math
import numbers

import torch

from .config import InputError
from .data import encode, keep_end, pad
from .dist import load_hf, load_tokenizer, print0, shard
from .ops import CACHE, contains_eos, position_ids_from_mask, prompt_forward, shares_prompts


def last_token_index(attention_mask):
    """Index of the last real token of each row, from the mask (left or right padding): (B, L) -> (B,)."""
    L = attention_mask.shape[-1]
    return L - 1 - attention_mask.long().flip(-1).argmax(-1)


def reward_model_scores(reward_model, input_ids, attention_mask, prompt_length=0):
    """Scalar reward per sequence (B,), read at the last real token found from the attention mask.

    Decoder heads (`.score`: Llama, Qwen2, GPT-2) give per-token logits that HF pools at the last
    token != pad_token_id, which is wrong when pad == eos and the sequence ends in EOS. We take the
    per-token logits with a forward hook (the call still goes through the wrapped model, so DDP and
    FSDP hooks run) and gather at the last real token; positions skip left padding. When the first
    prompt_length columns are left-padded prompts that rows share, each runs once (`prompt_forward`) and
    the rest on its KV cache. Encoder heads (BERT-style) pool the first token themselves: used as they are.
    """
    model = getattr(reward_model, "module", reward_model)  # DDP
    if model.config.num_labels != 1:
        raise InputError(f"a reward model needs num_labels=1, this one has {model.config.num_labels}")
    if getattr(model, "score", None) is None:
        return reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    P, cache = prompt_length, None
    if P and shares_prompts(input_ids[:, :P], attention_mask[:, :P]):
        cache = prompt_forward(reward_model, input_ids[:, :P], attention_mask[:, :P])[1]
    P = P if cache is not None else 0
    logits = head_logits(reward_model, input_ids=input_ids[:, P:], attention_mask=attention_mask, **{CACHE: cache},
                         position_ids=position_ids_from_mask(attention_mask)[:, P:], use_cache=cache is not None)
    return logits.gather(1, last_token_index(attention_mask)[:, None] - P).squeeze(1).float()  # past the prompt


def head_logits(model, **inputs):
    """Per-token logits (B, L) of a 1-label decoder classifier's `.score` head, captured by a forward hook while
    the call goes through the (DDP / FSDP2) wrapped model, so that their hooks run and gradients flow."""
    captured = []
    hook = getattr(model, "module", model).score.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        model(**inputs)
    finally:
        hook.remove()
    return captured[-1][..., 0]


def token_values(value_model, prompt_ids, prompt_mask, completion_ids):
    """PPO's V_t (B, T), float32: the value head at the state before each completion token, s_t = (x, y_<t), read
    at positions P-1 .. P+T-2 (TRL's value[:, P-1:-1]). Prompts left-padded (B, P), completions (B, T); values
    after EOS are whatever the head reads there: callers mask them (gae_advantages ignores them)."""
    T = completion_ids.shape[1]
    mask = torch.cat([prompt_mask.bool(), torch.ones_like(completion_ids, dtype=torch.bool)], dim=1)
    v = head_logits(value_model, input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=mask.long(),
                    position_ids=position_ids_from_mask(mask), use_cache=False)
    return v[:, -T - 1:-1].float()


def max_positions(config, tokenizer=None):
    """Tokens a model reads: max_position_embeddings (BERT 512), capped by the tokenizer's model_max_length."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((n for n in limits if isinstance(n, int) and 0 < n < 10**7), default=None)


def rm_sequences(rm_tokenizer, prompts, completions, max_length=None):
    """Ids of (prompt, completion text) as train_reward.py encodes them, cut by keep_end: (sequences, number cut)."""
    seqs, cut = [], 0
    for p, c in zip(prompts, completions):
        p_ids, c_ids = encode(rm_tokenizer, p, c if isinstance(p, str) else [{"role": "assistant", "content": c}])
        cut += max_length is not None and len(p_ids) + len(c_ids) > max_length
        seqs.append(keep_end(p_ids + c_ids, max_length or len(p_ids) + len(c_ids), rm_tokenizer.all_special_ids))
    return seqs, cut


def score_completions(reward_model, rm_tokenizer, prompts, completions, batch_size=None, device=None):
    """Reward-model scores (B,) of decoded completions, re-encoded with the reward model's tokenizer.

    Used when the reward model's tokenizer differs from the policy's (the policy's token ids mean
    nothing to it): `rm_sequences`, within the model's positions, right-padded. Returns (scores, number
    of sequences cut to fit the model)."""
    limit = max_positions(getattr(reward_model, "module", reward_model).config, rm_tokenizer)
    seqs, cut = rm_sequences(rm_tokenizer, prompts, completions, limit)
    out, n = [], batch_size or len(seqs)
    for i in range(0, len(seqs), n):
        ids, mask = pad(seqs[i:i + n], rm_tokenizer.pad_token_id, side="right")
        out.append(reward_model_scores(reward_model, ids.to(device), mask.to(device)))
    return torch.cat(out), cut


def load_function(spec):
    """'package.module:function' (or TRL's dotted 'package.module.function') -> the function (--reward_fn,
    --reward_funcs, --preference_fn)."""
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module or not name:
        raise InputError(f"expected 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        raise InputError(f"{spec}: cannot import {module} ({e}); is its folder on PYTHONPATH?") from e
    if not callable(fn):
        raise InputError(f"{spec}: {module} has no function {name!r} (expected 'module:function' or module.function)")
    return fn


def call_reward_fn(fn, prompts, completions, *more, low=-math.inf, high=math.inf, kwargs=None):
    """fn(prompts, completions, *more), or fn(**kwargs) -> one finite real per completion in [low, high] (a list,
    tuple, tensor or numpy array; with kwargs None too, read as NaN: unscorable, as TRL's GRPO), else InputError
    naming the function and the sample (a preference function gets a second completion list); an exception inside
    fn is reported with the batch it failed on. Returns a float32 tensor (B,)."""
    name = getattr(fn, "__name__", fn)
    try:
        values = fn(prompts, completions, *more) if kwargs is None else fn(**kwargs)
    except Exception as e:
        raise InputError(f"{name} raised {type(e).__name__}: {e} (on a batch of {len(completions)} completions; "
                         f"the first: {completions[0]!r:.120})") from e
    if hasattr(values, "tolist"):  # tensor, numpy array or numpy scalar
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise InputError(f"{name} returned {values!r:.80}, expected one number per completion")
    values = [v.item() if hasattr(v, "item") else math.nan if v is None and kwargs is not None else v for v in values]
    if len(values) != len(completions):
        raise InputError(f"{name} returned {len(values)} values for "
                         f"{len(completions)} completions")
    for i, v in enumerate(values):
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and (math.isfinite(v) and low <= v <= high
                                                                             or kwargs is not None and math.isnan(v))):
            raise InputError(f"{name} returned {v!r} for sample {i} (must be a finite "
                             f"number in [{low}, {high}]); completion: {completions[i]!r:.120}")
    return torch.tensor(values, dtype=torch.float32)


def call_reward_funcs(funcs, prompts, completions, completion_ids, columns):
    """TRL GRPO's reward functions, each called as fn(prompts=, completions=, completion_ids=, **columns): the
    dataset's prompts, the completion texts (for conversational prompts [{"role": "assistant", "content": text}]),
    the token id lists and the dataset's other columns as lists; a function without **kwargs gets the names it takes
    (so nanorlhf.world:gold_reward works too). Returns (B, F) float32, NaN where a function returned None."""
    if not isinstance(prompts[0], str):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    kw = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    out = []
    for fn in funcs:
        takes = inspect.signature(fn).parameters
        every = any(p.kind is p.VAR_KEYWORD for p in takes.values())
        picked = {k: v for k, v in kw.items() if every or k in takes}
        out.append(call_reward_fn(fn, prompts, completions, kwargs=picked))
    return torch.stack(out, 1)


class Scorer:
    """The score s(x, y) of rollouts: a reward model (1-label sequence classifier) or a function `module:fn`
    on (prompt texts, completion texts), minus missing_eos_penalty where the completion has no EOS.

    The reward model reads what train_reward.py trained it on (`data.encode`): prompt + completion up to and
    including its first EOS, scored at that EOS. With the policy's tokenizer and template the policy's ids
    are that sequence already; with another tokenizer the texts are re-encoded (`rm_sequences`)."""

    def __init__(self, tokenizer, reward_model_path="", reward_fn="", *, device=None, batch_size=64,
                 missing_eos_penalty=None, fsdp=False, bf16=False):
        from transformers import AutoModelForSequenceClassification
        self.tokenizer, self.device, self.batch_size = tokenizer, device, batch_size
        self.missing_eos_penalty, self.reward_fn, self.model, self.spec = missing_eos_penalty, None, None, reward_fn
        if reward_fn:
            self.reward_fn = load_function(reward_fn)
            return
        self.model = load_hf(AutoModelForSequenceClassification, reward_model_path)  # float32; --fsdp: sharded
        if not any("ForSequenceClassification" in k for k in self.model.config.architectures or []):
            raise InputError(f"{reward_model_path}: not a reward model (a {self.model.config.architectures} checkpoint "
                             "would get a random score head); train one with train_reward.py")
        if self.model.config.num_labels != 1:
            raise InputError(f"{reward_model_path}: num_labels={self.model.config.num_labels}; a reward model has 1")
        self.model.eval().requires_grad_(False)
        shard(self.model, bf16) if fsdp else self.model.to(device)
        self.rm_tokenizer = load_tokenizer(reward_model_path)
        self.same_tokenizer = self._reads_ids_of(tokenizer)

    def _reads_ids_of(self, tokenizer):  # the policy's ids are the reward model's: same vocabulary and template
        return self.rm_tokenizer.get_vocab() == tokenizer.get_vocab() and self.rm_tokenizer.chat_template == \
            tokenizer.chat_template

    def with_tokenizer(self, tokenizer):
        """The same reward (the model loaded once) for a policy that writes with another tokenizer."""
        if tokenizer is self.tokenizer:
            return self
        other = copy.copy(self)
        other.tokenizer = tokenizer
        other.same_tokenizer = self.model is not None and self._reads_ids_of(tokenizer)  # (a function: unused)
        return other

    @torch.no_grad()
    def __call__(self, prompts, ids, mask, tokens, cmask):
        """prompts: the dataset's prompts (strings or messages); ids/mask (B, P) left-padded prompts, tokens and
        cmask (B, T) the completions. Returns (scores (B,) float32, prompt texts, completion texts)."""
        p_texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        n = self.batch_size
        if self.reward_fn is not None:
            try:
                s = call_reward_fn(self.reward_fn, p_texts, texts).to(self.device)
            except InputError as e:
                raise InputError(f"--reward_fn {self.spec}: {e}") from e
        elif self.same_tokenizer:
            full, fmask = torch.cat([ids, tokens], 1), torch.cat([mask.long(), cmask.long()], 1)
            s = torch.cat([reward_model_scores(self.model, full[i:i + n], fmask[i:i + n], ids.shape[1])
                           for i in range(0, len(ids), n)])
        else:
            s, cut = score_completions(self.model, self.rm_tokenizer, prompts, texts, n, self.device)
            if cut:
                print0(f"reward model: {cut} of {len(texts)} sequences longer than its "
                       f"{max_positions(self.model.config, self.rm_tokenizer)} positions were cut from the start "
                       "(the end, where the score is read, is kept)")
        if self.missing_eos_penalty is not None:
            s = s - self.missing_eos_penalty * ~contains_eos(tokens, cmask, self.tokenizer.eos_token_id)
        return s.float(), p_texts, texts


def win_outcomes(scores, baseline_scores):
    """Per pair: 1 when the score beats the baseline's, 1/2 on a tie, 0 when it loses: (N,), (N,) -> (N,) float."""
    return (scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()


def mean_interval(values, z=1.96):
    """(mean, low, high) of per-prompt values (N,): mean -+ z * sd / sqrt(N), sd with ddof 1 (a normal 95%
    interval for z = 1.96; a prompt's samples are averaged first, so its samples count once); N = 1: no interval
    (nan bounds)."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not len(x):
        raise ValueError("mean_interval of no values")
    half = z * x.std().item() / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return x.mean().item(), x.mean().item() - half, x.mean().item() + half


def win_rate_interval(outcomes, z=1.96):
    """(win rate, low, high) of per-prompt outcomes in [0, 1] (N,): the Wilson score interval
    (c -+ h) with d = 1 + z^2/N, c = (p + z^2/(2N)) / d, h = z/d * sqrt(p(1-p)/N + z^2/(4N^2)), p the mean.
    p(1-p) bounds the variance of any [0, 1] outcome (ties, averaged samples), so ties make it wider, never
    narrower; unlike mean -+ z sd/sqrt(N) it keeps its coverage near 0 and 1 and never has zero width."""
    x = torch.as_tensor(outcomes, dtype=torch.float64).reshape(-1)
    if not len(x):
        raise ValueError("win_rate_interval of no outcomes")
    n, p = len(x), x.mean().item()
    d = 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(c - h, 0.0), min(c + h, 1.0)  # clamped: rounding put 1 + 2e-16 above 1
