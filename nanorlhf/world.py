"""The built-in offline world: a small, deterministic RLHF problem every script runs on by default.

Task ("mood words"). A user message is a mood word (happy / gloomy) and two or three topic
words, e.g. "gloomy cat rain". The assistant answers with a few words from a 24-word lexicon:
8 positive, 8 negative, 8 neutral. The gold reward (what a careful human rater would say):
  + 1 for each distinct word whose polarity matches the mood, - 1 for each of the opposite one,
  - 1 for each repeated word, - 0.5 for each word beyond the sixth; divided by 6 (best = 1.0).
The initial policy is a tiny Llama fine-tuned on answers of random words that lean only slightly
to the mood, so it scores about 0.07 (best 1.0). Preference pairs are two policy answers to one
prompt labelled by the gold reward, ties dropped. The policy often repeats a word, and a small
reward model learns "count the matching words" much sooner than the repeat penalty (it reaches
about 92% pairwise accuracy, the misses nearly all repeats): an RL run that pushes such a learned
reward too hard repeats matching words, and the gold reward falls while the learned one rises.
Written to disk as HF folders and JSONL files; the scripts read them like any real model and data.
"""
import json
import os
import random
import sys
import tempfile

import torch

POSITIVE = "good great joy love nice warm bright kind".split()
NEGATIVE = "bad awful hurt hate grim cold dark cruel".split()
NEUTRAL = "cat tree road cup door rain box hill".split()
MOODS = {"happy": POSITIVE, "gloomy": NEGATIVE}
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %} <eos>{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VERSION = 1


def gold_reward(prompts, completions):
    """Gold reward of each completion text given its prompt text (see the module docstring); prompts and
    completions may also be messages (TRL's GRPO reward functions get them so): their contents are read."""
    text = lambda x: x if isinstance(x, str) else " ".join(m["content"] for m in x)  # noqa: E731
    scores = []
    for prompt, completion in zip(map(text, prompts), map(text, completions)):
        mood = next((w for w in prompt.split() if w in MOODS), None)
        words = [w for w in completion.split() if not w.startswith("<")]
        good, bad = MOODS.get(mood, []), [w for m, ws in MOODS.items() if m != mood for w in ws]
        distinct = set(words)
        score = sum(w in good for w in distinct) - sum(w in bad for w in distinct)
        score -= len(words) - len(distinct) + 0.5 * max(0, len(words) - 6)
        scores.append(score / 6.0)
    return scores


def make_tokenizer():
    """A word-level tokenizer built in code: pad (0) distinct from eos (1), and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIALS + list(MOODS) + POSITIVE + NEGATIVE + NEUTRAL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   extra_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE,
                                   padding_side="left")


def make_model(tokenizer, seed=0):
    """A tiny Llama (2 blocks, width 64, tied embeddings) made from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def sample_prompt(rng):
    return " ".join([rng.choice(list(MOODS))] + rng.sample(NEUTRAL, rng.choice([2, 3])))


def sample_answer(rng, prompt):
    """The behaviour the initial policy imitates: 1-6 distinct words with a mild lean to the mood
    (a matching word is twice as likely as an opposite one), now and then a repeated word."""
    lean = {w: 1.4 for w in MOODS[prompt.split()[0]]} | {w: 0.7 for m in MOODS.values() for w in m
                                                         if w not in MOODS[prompt.split()[0]]}
    pool, words = POSITIVE + NEGATIVE + NEUTRAL, []
    for _ in range(rng.randint(1, 6)):
        words += rng.choices([w for w in pool if w not in words], [lean.get(w, 1.0) for w in pool if w not in words])
    if rng.random() < 0.05:
        words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    return " ".join(words)


def _sft(model, tokenizer, rng, steps=400, batch=64):
    """Supervised fine-tuning on `sample_answer` (cross-entropy on the assistant tokens)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            prompt = sample_prompt(rng)
            p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=False)
            rows.append((tokenizer(p)["input_ids"], tokenizer(sample_answer(rng, prompt) + " <eos>")["input_ids"]))
        L = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((batch, L), tokenizer.pad_token_id)
        labels = torch.full((batch, L), -100)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id),
                     labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _policy_answers(model, tokenizer, prompts, seed):
    """Two sampled answers per prompt from the initial policy (temperature 1)."""
    from .sampling import generate, rollout_seeds
    msgs = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]
    enc = tokenizer(msgs, return_tensors="pt", padding=True)
    outs = []
    for j in range(2):
        toks, _, _ = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              seeds=rollout_seeds(seed, range(len(prompts)), j))
        outs.append(tokenizer.batch_decode(toks, skip_special_tokens=True))
    return list(zip(*outs))


def build(root, seed=0, n_prompts=(2000, 200), n_pairs=(4000, 400)):
    """Write the world to `root`: policy/ (model + tokenizer), prompts/, preferences/, world.json."""
    rng = random.Random(seed)
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed)
    sft_loss = _sft(model, tokenizer, rng)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    summary = {"version": VERSION, "sft_loss": round(sft_loss, 4)}
    for split, n_p, n_pair in zip(["train", "test"], n_prompts, n_pairs):
        prompts = [sample_prompt(rng) for _ in range(n_p)]
        _write_jsonl(f"{root}/prompts/{split}.jsonl", [{"prompt": [{"role": "user", "content": p}]}
                                                       for p in prompts])
        pair_prompts = [sample_prompt(rng) for _ in range(int(n_pair * 1.3))]
        answers = _policy_answers(model, tokenizer, pair_prompts, seed + (split == "test"))
        pairs, golds = [], []
        for p, (a, b) in zip(pair_prompts, answers):
            ga, gb = gold_reward([p, p], [a, b])
            golds += [ga, gb]
            if ga != gb and len(pairs) < n_pair:
                c, r = (a, b) if ga > gb else (b, a)
                pairs.append({"prompt": [{"role": "user", "content": p}],
                              "chosen": [{"role": "assistant", "content": c}],
                              "rejected": [{"role": "assistant", "content": r}]})
        _write_jsonl(f"{root}/preferences/{split}.jsonl", pairs)
        summary[f"{split}_prompts"], summary[f"{split}_pairs"] = n_p, len(pairs)
        summary[f"initial_gold_reward_{split}"] = round(sum(golds) / len(golds), 4)
    model.save_pretrained(f"{root}/policy")
    tokenizer.save_pretrained(f"{root}/policy")
    with open(f"{root}/world.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def default_root():
    return os.environ.get("NANORLHF_WORLD", os.path.join(os.path.expanduser("~"), ".cache", "nanorlhf",
                                                         f"world-v{VERSION}"))


def ensure(root=None):
    """Path of the built world, building it once (into a temp dir, then renamed: never half-written)."""
    root = root or default_root()
    if not os.path.exists(os.path.join(root, "world.json")):
        print(f"building the built-in world in {root} (once, about 35 s on one CPU core)", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".world-", dir=os.path.dirname(os.path.abspath(root)))
        build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process built it first
            if not os.path.exists(os.path.join(root, "world.json")):
                raise
    return root


if __name__ == "__main__":
    path = ensure(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"built-in world at {path}")
    print(open(os.path.join(path, "world.json")).read())
