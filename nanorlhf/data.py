"""Datasets in, token ids out: hub names or local json / jsonl / jsonl.gz / parquet, TRL formats.

Formats (TRL): "standard" rows hold strings, "conversational" rows hold lists of
{"role", "content"} messages. Preference rows have chosen/rejected and either an explicit
prompt or an implicit one (the shared prefix; for hh-rlhf transcripts, everything up to the last
"\n\nAssistant:"). Prompt-only rows have a prompt. Bad rows raise ValueError naming file, row, field.
"""
import glob
import gzip
import hashlib
import json
import math
import os

import torch

from .config import InputError
from .dist import print0

EXTENSIONS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}
HH_MARKER = "\n\nAssistant:"


class MissingSplit(FileNotFoundError):
    """The dataset has no such split (a script may then train without evaluation)."""


def _kind(path):
    return next((k for ext, k in EXTENSIONS.items() if path.endswith(ext)), None)


def _first_bad_json_line(path):
    n = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line.strip() and json.loads(line)
    except json.JSONDecodeError as e:
        return f"line {n}: {e}"
    except UnicodeDecodeError as e:
        return f"line {n + 1}: not UTF-8 ({e})"
    except (EOFError, OSError) as e:  # gzip.BadGzipFile is an OSError
        return f"after line {n}: the file is cut or corrupt ({type(e).__name__}: {e})"
    return None


def load_rows(name_or_path, split="train"):
    """A `datasets.Dataset`: a local file, a local folder (files named after the split), or a hub name."""
    import datasets
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", f"{split}*"), recursive=True) if _kind(f))
        if not files:
            raise MissingSplit(f"{path}: no {split}.jsonl / {split}.jsonl.gz / {split}.parquet file in folder")
    elif os.path.isfile(path):
        if not _kind(path):
            raise InputError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}")
        if split != "train":
            raise MissingSplit(f"{path}: a single file has only the 'train' split, asked for {split!r}")
        files = [path]
    elif _kind(name_or_path) or name_or_path.startswith((".", os.sep, "~")) or name_or_path.count("/") > 1 \
            or os.path.isdir(name_or_path.split("/")[0]):  # a hub name is "name" or "owner/name"
        raise InputError(f"{name_or_path}: no such file or folder")
    else:
        try:
            return datasets.load_dataset(name_or_path, split=split)
        except Exception as e:  # no such split; offline, unknown name, no access
            if isinstance(e, ValueError) and "split" in str(e).lower():
                raise MissingSplit(f"{name_or_path}: {e}") from e
            raise InputError(f"{name_or_path}: not a local file or folder, and the hub dataset did not load "
                             f"({type(e).__name__}: {e})") from e
    if any(os.path.getsize(f) == 0 for f in files):
        raise InputError(f"{next(f for f in files if os.path.getsize(f) == 0)}: empty file")
    for f in (f for f in files if _kind(f) == "json"):  # not UTF-8, a cut .gz: found before datasets half-reads
        try:  # them (decoding is 5x cheaper than parsing each line, which only a failed load pays for)
            with (gzip.open if f.endswith(".gz") else open)(f, "rt", encoding="utf-8") as text:
                while text.read(1 << 24):
                    pass
        except (UnicodeDecodeError, EOFError, OSError):
            raise InputError(f"{f}: {_first_bad_json_line(f)}") from None
    try:
        ds = datasets.load_dataset(_kind(files[0]), data_files=files, split="train")
    except Exception as e:
        bad = next((f"{f}: {b}" for f in files if _kind(f) == "json" for b in [_first_bad_json_line(f)] if b), None)
        raise InputError(bad or f"{', '.join(files)}: unreadable ({type(e).__name__}: {e})") from e
    if len(ds) == 0:
        raise InputError(f"{', '.join(files)}: no rows")
    return ds


def _check(value, source, row, field):
    """A field is a non-empty string or a non-empty list of {role, content} messages with string content."""
    where = f"{source}: row {row}, field {field!r}"
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: empty string")
    elif isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InputError(f"{where}: messages must be {{'role': str, 'content': str}}, got {m!r:.80}")
        if field.startswith("prompt") and not any(m["content"].strip() for m in value):  # (an empty answer is one)
            raise InputError(f"{where}: every message's content is empty")
    else:
        raise InputError(f"{where}: expected a non-empty string or list of messages, got {value!r:.80}")
    return value


def _split_implicit(chosen, rejected, source, row):
    """Prompt = shared prefix (whole messages; for strings cut back to the last hh-rlhf marker)."""
    if type(chosen) is not type(rejected):
        raise InputError(f"{source}: row {row}: 'chosen' and 'rejected' mix strings and messages")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and HH_MARKER in chosen[:n]:
        n = chosen.rindex(HH_MARKER, 0, n) + len(HH_MARKER)
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    _check(prompt, source, row, "prompt (the shared prefix of chosen and rejected)")
    return prompt, chosen, rejected  # an empty answer alone is allowed: hh-rlhf has a few


def preference_pairs(ds, source):
    """Rows -> [{"prompt", "chosen", "rejected", "margin"}]; margin from a `margin` column, else None.
    Pairs whose chosen and rejected answers are identical carry no preference: dropped and counted."""
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise InputError(f"{source}: preference data needs columns 'chosen' and 'rejected'; missing "
                         f"{missing}, found {ds.column_names}")
    pairs, same = [], []
    for i, r in enumerate(ds):
        c, rj = _check(r["chosen"], source, i, "chosen"), _check(r["rejected"], source, i, "rejected")
        if r.get("prompt") is None:
            p, c, rj = _split_implicit(c, rj, source, i)
        else:
            p = _check(r["prompt"], source, i, "prompt")
            if isinstance(p, str) != isinstance(c, str) or isinstance(p, str) != isinstance(rj, str):
                raise InputError(f"{source}: row {i}: 'prompt', 'chosen' and 'rejected' mix strings and messages "
                                 "(one row is all text or all conversational)")
        m = r.get("margin")
        if m is not None and not (isinstance(m, (int, float)) and math.isfinite(m)):
            raise InputError(f"{source}: row {i}, field 'margin': expected a finite number, got {m!r}")
        if c == rj:
            same.append(i)
        else:
            pairs.append({"prompt": p, "chosen": c, "rejected": rj, "margin": m})
    if same:
        print0(f"{source}: dropped {len(same)} pairs whose chosen and rejected are identical (rows {same[:5]}"
               f"{' ...' if len(same) > 5 else ''})")
    return pairs


def prompts_of(ds, source):
    """Prompt-only rows (a `prompt` column), or the prompts of preference rows."""
    if "prompt" in ds.column_names and "chosen" not in ds.column_names:
        return [_check(r["prompt"], source, i, "prompt") for i, r in enumerate(ds)]
    if "chosen" in ds.column_names:
        return [p["prompt"] for p in preference_pairs(ds, source)]
    raise InputError(f"{source}: prompt data needs a 'prompt' column (or 'chosen'/'rejected'), "
                     f"found {ds.column_names}")


def render(tokenizer, prompt, completion=None):
    """(prompt_text, completion_text): the chat template for messages, the strings as they are otherwise."""
    if isinstance(prompt, str):
        return prompt, completion
    if tokenizer.chat_template is None:  # e.g. a BERT reward model: plain "role: content" lines
        p = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
        return p, None if completion is None else " " + " ".join(m["content"] for m in completion)
    p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    if completion is None:
        return p, None
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(p):
        raise InputError("chat template: prompt + completion does not start with the rendered prompt")
    return p, full[len(p):]


def encode(tokenizer, prompt, completion=None):
    """Token ids of the prompt and of the completion: the one convention of training and scoring.

    A completion ends at its first EOS, inclusive, and the reward is read there. Chat-template text
    already holds its special tokens; whatever the template writes after the EOS (ChatML's "\n" after
    <|im_end|>) is dropped, because the policy stops at the EOS and its rollouts are scored there.
    Otherwise the prompt gets the tokenizer's own specials (BOS, or BERT's [CLS] ... [SEP]) and the
    completion an EOS when it lacks one (as TRL does)."""
    p, c = render(tokenizer, prompt, completion)
    templated = not isinstance(prompt, str) and tokenizer.chat_template is not None
    p_ids = tokenizer(p, add_special_tokens=not templated)["input_ids"]
    if c is None:
        return p_ids, None
    c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in c_ids:
        c_ids = c_ids[:c_ids.index(eos) + 1]
    elif not templated and eos is not None:
        c_ids = c_ids + [eos]
    return p_ids, c_ids


def keep_end(ids, max_length, special_ids=()):
    """ids cut to max_length tokens from the start, keeping a leading special token ([CLS], BOS): the end
    is where a chosen and a rejected completion differ and where the reward is read."""
    if len(ids) <= max_length:
        return ids
    head = ids[:1] if ids[0] in special_ids else []
    return head + ids[len(ids) - max_length + len(head):]


def tokenize_pairs(tokenizer, pairs, max_length, model_max_length=None):
    """[(chosen_ids, rejected_ids, margin)] of prompt + completion. Pairs longer than max_length are dropped
    (never truncated, as TRL); a pair within max_length but beyond the model's positions (BERT: 512) is
    cut from the start by keep_end. Returns (rows, number dropped, number cut)."""
    rows, cut, limit = [], 0, model_max_length or max_length
    for pair in pairs:
        p, c = encode(tokenizer, pair["prompt"], pair["chosen"])
        _, r = encode(tokenizer, pair["prompt"], pair["rejected"])
        if max(len(p) + len(c), len(p) + len(r)) <= max_length:
            cut += max(len(p) + len(c), len(p) + len(r)) > limit
            rows.append((keep_end(p + c, limit, tokenizer.all_special_ids),
                         keep_end(p + r, limit, tokenizer.all_special_ids), pair["margin"]))
    return rows, len(pairs) - len(rows), cut


def tokenize_prompts(tokenizer, prompts, max_prompt_length):
    """[(prompt_index, ids)] for prompts of at most max_prompt_length tokens; returns (rows, dropped). A policy
    needs a chat template for conversational prompts (else they render as lines it never saw)."""
    if tokenizer.chat_template is None and any(not isinstance(p, str) for p in prompts):
        raise InputError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: conversational prompts need a chat "
                         "template and this tokenizer has none; use a chat/instruct model or string prompts")
    rows = [(i, encode(tokenizer, p)[0]) for i, p in enumerate(prompts)]
    kept = [(i, ids) for i, ids in rows if len(ids) <= max_prompt_length]
    return kept, len(rows) - len(kept)


def epoch_order(lengths, seed, global_batch, group_by_length=False):
    """One epoch's permutation of the rows, a fixed function of seed; group_by_length (HF's): chunks of 50 global
    batches sorted by length, batches in random order (little padding), the dropped last partial batch left out."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    size, end = 50 * global_batch, len(lengths) // global_batch * global_batch
    for c in range(0, end, size) if group_by_length else ():
        chunk = sorted(order[c:min(c + size, end)], key=lambda j: -lengths[j])
        batches = torch.randperm(len(chunk) // global_batch, generator=g).tolist()
        order[c:c + len(chunk)] = [j for b in batches for j in chunk[b * global_batch:(b + 1) * global_batch]]
    return order


def pad(seqs, pad_id, side="left"):
    """List of id lists -> (ids, mask) (N, L) long tensors padded on `side`."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def held_out(prompt, fraction):
    """Deterministic split by prompt: True for about `fraction` of distinct prompts, same on every run."""
    h = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction
