"""The built-in world: a fair small RLHF problem, on disk in real formats."""
import json
import os

import pytest
import torch

from nanorlhf import generate, load_rows, pad, preference_pairs, prompts_of, rollout_seeds, tokenize_prompts
from nanorlhf.world import gold_reward


def test_gold_reward_by_hand():
    # happy: good, joy (+2), bad (-1) -> 1/6; gloomy: 7 distinct negative words (+7), one repeat (-1),
    # 8 words (-0.5 * 2) -> 5/6; optimum: six distinct matching words -> 1
    assert gold_reward(["happy cat", "gloomy box", "happy"],
                       ["good joy bad", "dark dark cold grim hurt cruel bad hate", "good great joy love nice warm"]) \
        == pytest.approx([1 / 6, 5 / 6, 1.0])
    assert gold_reward(["<|user|> gloomy tree <|assistant|>"], ["good <eos>"]) == pytest.approx([-1 / 6])


def test_world_on_disk_loads_through_the_real_paths(world_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    summary = json.load(open(os.path.join(world_root, "world.json")))
    tok = AutoTokenizer.from_pretrained(os.path.join(world_root, "policy"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(world_root, "policy")).eval()
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2
    pairs = preference_pairs(load_rows(os.path.join(world_root, "preferences"), "train"), "prefs")
    assert len(pairs) == summary["train_pairs"] >= 3000
    p, c, r = pairs[0]["prompt"], pairs[0]["chosen"][0]["content"], pairs[0]["rejected"][0]["content"]
    assert gold_reward([p[0]["content"]] * 2, [c, r])[0] > gold_reward([p[0]["content"]] * 2, [c, r])[1]
    prompts = prompts_of(load_rows(os.path.join(world_root, "prompts"), "test"), "prompts")
    assert len(prompts) == summary["test_prompts"]
    # the initial policy answers in format, ends with EOS, and is far from optimal (gold ~0, best is 1)
    rows, _ = tokenize_prompts(tok, prompts[:64], 16)
    ids, mask = pad([r for _, r in rows], tok.pad_token_id)
    toks, m, _ = generate(model, ids, mask, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, seeds=rollout_seeds(0, range(64)))
    texts = tok.batch_decode(toks, skip_special_tokens=True)
    gold = torch.tensor(gold_reward([p[0]["content"] for p in prompts[:64]], texts))
    assert (toks == tok.eos_token_id).any(-1).float().mean() > 0.9
    assert -0.3 < gold.mean().item() < 0.3 and abs(summary["initial_gold_reward_test"]) < 0.3
    lengths = m.sum(-1).float()
    assert 2 <= lengths.mean().item() <= 6
