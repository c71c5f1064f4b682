"""examples/gsm8k_smollm2.py: its data (shipped, checksummed), its two reward functions by hand, its prompts, and
(slow) the whole example at a tiny budget."""
import gzip
import hashlib
import importlib.util
import json
import os

import pytest

from scripts import ROOT, env

GSM8K = os.path.join(ROOT, "examples", "data", "gsm8k")


def _example():
    spec = importlib.util.spec_from_file_location("gsm8k_smollm2", os.path.join(ROOT, "examples", "gsm8k_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("split, digest, rows", [
    ("train", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 7473),
    ("test", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 1319)])
def test_the_shipped_problems_are_openais_files(split, digest, rows):
    with gzip.open(os.path.join(GSM8K, f"{split}.jsonl.gz"), "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == digest and data.count(b"\n") == rows
    with open(os.path.join(GSM8K, "SOURCE.md")) as f:
        assert digest in f.read()
    with open(os.path.join(GSM8K, "LICENSE")) as f:
        assert f.read().startswith("MIT License")


def test_rewards_by_hand():
    g = _example()
    completions = ["3 + 4 = 7\n#### 7", "so 1,200 eggs.\n#### 1,200.", "#### 7\nthe answer is 7", "7", "#### 8\n#### 7",
                   [{"role": "assistant", "content": "x\n\n####   -2.5\n"}]]
    answers = ["7", "1200", "7", "7", "7", "-2.5"]
    # the number after the last ####, compared as a number: right, right (commas, a final "."), right (the #### is
    # not last, but the number is the answer), no ####, the last #### is 7, a conversational completion
    assert g.accuracy_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    # format: 0.5 for stating "#### <number>", 0.5 more when that is the last non-empty line and the only ####
    # (1,200. ends in "."; the third goes on after it; the fifth has two ####)
    assert g.format_reward(completions) == [1.0, 0.5, 0.5, 0.0, 0.5, 1.0]


def test_prepare_writes_conversational_prompts_and_numeric_answers(tmp_path):
    g = _example()
    counts = g.prepare(GSM8K, str(tmp_path))
    assert counts == {"train": 7473, "test": 1319}
    with open(tmp_path / "data" / "test.jsonl") as f:
        first = json.loads(f.readline())
    assert first["answer"] == "18" and first["prompt"][0]["role"] == "user"
    text = first["prompt"][0]["content"]
    assert text.startswith("Janet") and text.endswith('"#### <number>".')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(SystemExit, match="row 0: needs a question and an answer ending in '#### <number>'"):
        g.prepare(str(tmp_path / "bad"), str(tmp_path / "out"))


@pytest.mark.slow
@pytest.mark.skipif(None in [importlib.util.find_spec(n) for n in ("gguf", "accelerate")],
                    reason='needs pip install -e ".[hh]"')
def test_gsm8k_smollm2_at_a_tiny_budget(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "gsm8k_smollm2.py"), "--out", str(tmp_path),
                        "--max_steps", "1", "--eval_problems", "4", "--max_new_tokens", "16"], env=env(),
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("eval_before.json", "eval_after.json", "rl/model.safetensors", "report.md"):
        assert (tmp_path / name).exists(), name
    after = json.loads((tmp_path / "eval_after.json").read_text())["results"]
    assert len(after) == 4 and all(set(r) >= {"completion", "answer", "length", "eos"} for r in after)
    records = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    assert any("rewards/accuracy_reward/mean" in r and "rewards/format_reward/mean" in r for r in records)
    assert "| GRPO |" in (tmp_path / "report.md").read_text()
    # run again: the initial policy's answers are reused, the rest runs again
    r = subprocess.run(r.args, env=env(), capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0 and r.stdout.count("reusing the answers") == 1, r.stderr[-3000:]
