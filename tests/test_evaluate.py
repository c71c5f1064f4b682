"""evaluate.py end to end: win rates against the initial policy, determinism, DDP, several models, bad inputs, plots."""
import json
import os

import pytest

from scripts import fails, run

SCRIPT = "evaluate.py"
FAST = ["--num_prompts", 40, "--max_new_tokens", 8]


@pytest.fixture(scope="module")
def trained(world_root, tmp_path_factory):
    """A short RLOO run on the built-in world (gold reward): 30 steps of 64 completions."""
    out = tmp_path_factory.mktemp("rloo") / "rloo"
    run("train_rloo.py", "--output_dir", out, "--total_episodes", 1920, "--eval_steps", 10, "--num_eval_prompts", 32,
        "--num_sample_generations", 0)
    return str(out)


def results(out):
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)["results"]


def test_trained_policy_beats_its_initial_policy_and_itself_ties(world_root, trained, tmp_path):
    # the baseline is read from the run's args.json: the world's initial policy; the judge is the gold reward
    policy = os.path.join(world_root, "policy")
    run(SCRIPT, "--model_name_or_path", trained, policy, "--baseline_model_path", policy, "--output_dir",
        tmp_path / "a", *FAST)
    won, itself = results(tmp_path / "a")
    assert won["baseline"] == policy and won["baseline_is_reference"] and won["judge"] == "nanorlhf.world:gold_reward"
    assert won["win_rate_ci"][0] > 0.5 and won["score"] > won["baseline_score"] and won["kl_k1"] > 0.1
    # against itself: independent samples (the baseline's own seeds), so a win rate near 0.5 with an interval that
    # holds it and has width, a score difference whose interval holds 0, and KL exactly 0
    lo, hi = itself["win_rate_ci"]
    assert lo < 0.5 < hi and hi - lo > 0.1 and itself["kl_k1"] == 0.0 and itself["kl_k3"] == 0.0
    assert itself["score_diff_ci"][0] < 0 < itself["score_diff_ci"][1]
    assert itself["score_diff"] == pytest.approx(itself["score"] - itself["baseline_score"])
    table = (tmp_path / "a" / "eval.md").read_text()
    assert table.count(f"| {trained} |") == 1 and table.count(f"| {policy} |") == 1
    rows = [json.loads(line) for line in (tmp_path / "a" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 40 and {"prompt", "completion", "baseline_completion", "score", "baseline_score"} <= set(
        rows[0])
    same = [r for r in rows if r["model"] == policy]
    assert sum(r["completion"] != r["baseline_completion"] for r in same) > 20  # one seed each: coupled would be 0
    assert all(r["outcome"] == (r["score"] > r["baseline_score"]) + 0.5 * (r["score"] == r["baseline_score"])
               for r in rows)
    # a second evaluation of the same folder agrees exactly; 2 processes (prompts split) give the same numbers
    run(SCRIPT, "--model_name_or_path", trained, "--output_dir", tmp_path / "b", *FAST)
    assert results(tmp_path / "b")[0] == won
    run(SCRIPT, "--model_name_or_path", trained, "--output_dir", tmp_path / "c", *FAST, procs=2)
    two = results(tmp_path / "c")[0]
    assert all(two[k] == pytest.approx(v, abs=1e-6) for k, v in won.items() if k != "win_rate_ci")
    assert two["win_rate_ci"] == pytest.approx(won["win_rate_ci"])


def test_samples_and_a_reward_model_judge(world_root, trained, tmp_path):
    run("train_reward.py", "--output_dir", tmp_path / "rm", "--max_steps", 2, "--per_device_train_batch_size", 4)
    run(SCRIPT, "--model_name_or_path", trained, "--reward_model_path", tmp_path / "rm", "--num_samples", 2,
        "--output_dir", tmp_path / "out", *FAST)
    (r,) = results(tmp_path / "out")
    assert r["judge"] == str(tmp_path / "rm") and r["samples_per_prompt"] == 2 and r["prompts"] == 40
    assert r["score_ci"][0] < r["score"] < r["score_ci"][1]


def test_plots_from_real_runs(world_root, trained, tmp_path):
    from PIL import Image
    pytest.importorskip("matplotlib")
    run("train_ppo.py", "--output_dir", tmp_path / "ppo", "--total_episodes", 640, "--eval_steps", 5,
        "--num_eval_prompts", 16, "--num_sample_generations", 0, "--num_ppo_epochs", 1)
    with open(tmp_path / "ppo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "loss": 0.1')  # a line torn by a kill mid-append: left out
    run(SCRIPT, "--plot", trained, tmp_path / "ppo", "--output_dir", tmp_path / "report")
    for name, size in (("curves.png", (1500, 400)), ("frontier.png", (600, 450))):
        with Image.open(tmp_path / "report" / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size == size


def _fails(*args, pythonpath=()):
    return fails(SCRIPT, *args, pythonpath=pythonpath)


def test_each_model_with_its_own_tokenizer(world_root, trained, tmp_path):
    # a second policy whose tokenizer encodes the prompts otherwise ("happy rain" is one token): in one evaluation
    # with the first, each model reads and writes with its own tokenizer, so each result is the one it gets alone
    import shutil
    import torch
    from transformers import AutoModelForCausalLM
    import nanorlhf as nr
    tok = nr.load_tokenizer(os.path.join(world_root, "policy"))
    assert tok.add_tokens(["happy rain"]) == 1
    model = AutoModelForCausalLM.from_pretrained(os.path.join(world_root, "policy"), dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    for folder in ("b0", "b"):
        model.save_pretrained(tmp_path / folder)
        tok.save_pretrained(tmp_path / folder)
    (tmp_path / "b" / "args.json").write_text(json.dumps({"model_name_or_path": str(tmp_path / "b0")}))
    run(SCRIPT, "--model_name_or_path", trained, tmp_path / "b", "--output_dir", tmp_path / "both", *FAST)
    run(SCRIPT, "--model_name_or_path", tmp_path / "b", "--output_dir", tmp_path / "alone", *FAST)
    run(SCRIPT, "--model_name_or_path", trained, "--output_dir", tmp_path / "first", *FAST)
    both = results(tmp_path / "both")
    assert both == results(tmp_path / "first") + results(tmp_path / "alone")
    assert both[1]["kl_k1"] == 0.0  # b is b0: a model against its own copy
    rows = [json.loads(line) for line in (tmp_path / "both" / "eval_samples.jsonl").read_text().splitlines()]
    assert any("happy rain" in r["prompt"] for r in rows if r["model"] == str(tmp_path / "b"))
    shutil.rmtree(tmp_path / "b0")


def test_bad_inputs(world_root, trained, tmp_path, monkeypatch):
    out = ["--output_dir", tmp_path / "o", *FAST]
    assert "pass --model_name_or_path" in _fails(*out)
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForSequenceClassification(LlamaConfig(vocab_size=32, num_labels=1, **cfg)).save_pretrained(tmp_path / "rm")
    __import__("nanorlhf").load_tokenizer(trained).save_pretrained(tmp_path / "rm")
    err = _fails("--model_name_or_path", trained, tmp_path / "rm", "--baseline_model_path", trained, *out)
    assert "rm: a sequence classifier" in err
    assert "no config.json" in _fails("--model_name_or_path", tmp_path, "--baseline_model_path", trained, *out)
    LlamaForCausalLM(LlamaConfig(vocab_size=99, **cfg)).save_pretrained(tmp_path / "v99")
    err = _fails("--model_name_or_path", trained, "--baseline_model_path", tmp_path / "v99", *out)
    assert "v99: cannot load a tokenizer" in err or "its tokenizer is not its baseline" in err  # (5.0 makes one up)
    nr_tok = __import__("nanorlhf").load_tokenizer(trained)
    nr_tok.save_pretrained(tmp_path / "v99")
    err = _fails("--model_name_or_path", trained, "--baseline_model_path", tmp_path / "v99", *out)
    assert f"its baseline {tmp_path / 'v99'} has 99: a model and its baseline must share one tokenizer" in err
    nr_tok.add_tokens(["happy rain"])  # another tokenizer: refused as the baseline of a model with the first
    nr_tok.save_pretrained(tmp_path / "v99")
    err = _fails("--model_name_or_path", trained, "--baseline_model_path", tmp_path / "v99", *out)
    assert f"{trained}: its tokenizer is not its baseline {tmp_path / 'v99'}'s" in err
    (tmp_path / "judges.py").write_text(
        "def short(prompts, completions):\n    return [0.0]\n"
        "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n"
        "def pref(prompts, a, b):\n    return [1.5] * len(a)\n")
    err = _fails("--model_name_or_path", trained, "--reward_fn", "judges:short", *out, pythonpath=[tmp_path])
    assert "short returned 1 values for 40 completions" in err
    err = _fails("--model_name_or_path", trained, "--reward_fn", "judges:nan", *out, pythonpath=[tmp_path])
    assert "nan returned nan for sample 0" in err
    err = _fails("--model_name_or_path", trained, "--preference_fn", "judges:pref", *out, pythonpath=[tmp_path])
    assert "pref returned 1.5 for sample 0 (must be a finite number in [0.0, 1.0])" in err
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "happy " * 600}) + "\n")
    err = _fails("--model_name_or_path", trained, "--dataset_name", tmp_path / "empty.jsonl", "--dataset_test_split",
                 "train", "--reward_fn", "nanorlhf.world:gold_reward", "--max_prompt_length", 64, *out)
    assert "no prompts to evaluate (all 1 longer than max_prompt_length 64)" in err
    assert "no args.json naming the model it was trained from" in _fails("--model_name_or_path", tmp_path / "v99",
                                                                          *out)
    assert "pass --plot (run folders to draw) or --model_name_or_path" in _fails("--plot", trained,
                                                                                 "--model_name_or_path", trained)
    assert "no metrics.jsonl" in _fails("--plot", tmp_path / "v99", "--output_dir", tmp_path / "p")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n')  # torn, then more: not a kill
    assert "metrics.jsonl: line 1 is not JSON" in _fails("--plot", tmp_path / "torn", "--output_dir", tmp_path / "p")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert 'pip install -e ".[plot]"' in _fails("--plot", trained, "--output_dir", tmp_path / "p")
