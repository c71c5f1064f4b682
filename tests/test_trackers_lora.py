"""Experiment trackers (--report_to, read back from each library's own files) and LoRA (--use_peft) on every script."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from scripts import ROOT, fails, kill_after, metrics, run, weights

RLOO = ["--per_device_train_batch_size", 8, "--total_episodes", 16, "--response_length", 8, "--num_eval_prompts", 16,
        "--num_sample_generations", 0]


def _final(recs, key):
    return [r for r in recs if key in r][-1]


# ----------------------------------------------------------------------------- trackers
def test_tensorboard_holds_the_logged_scalars(world_root, tmp_path):
    pytest.importorskip("tensorboard")
    SummaryReader = pytest.importorskip("tbparse").SummaryReader
    run("train_rloo.py", "--output_dir", tmp_path / "out", *RLOO, "--report_to", "tensorboard", "--run_name", "r1")
    df = SummaryReader(str(tmp_path / "out" / "tensorboard" / "r1")).scalars
    for r in metrics(tmp_path / "out"):  # every record, same names, same steps (float32 in the event file)
        for k, v in r.items():
            if k != "step":
                got = df[(df.tag == k) & (df.step == r["step"])].value.tolist()
                assert got == [pytest.approx(v, rel=1e-6, abs=1e-7)], (k, r["step"], got, v)


def test_wandb_offline_summary_holds_the_final_metrics(world_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "nanorlhf-tests")
    run("train_ppo.py", "--output_dir", tmp_path / "out", *RLOO, "--report_to", "wandb")
    (log,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out" / "wandb") for f in fs if f.endswith(".wandb")
              and "offline-run" in d]
    records = [json.loads(line) for line in subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                                                            log], capture_output=True, text=True).stdout.splitlines()]
    summary, config = {}, {}
    for rec in records:
        summary.update(rec.get("summary", {}).get("update", {}))
        if rec.get("type") == "run":
            config = rec["run"]["config"]["update"]
    recs = metrics(tmp_path / "out")
    for key in ("objective/scores", "loss/value_avg", "eval/gold_reward"):
        assert summary[key] == pytest.approx(_final(recs, key)[key])
    assert config["output_dir"] == str(tmp_path / "out") and config["vf_coef"] == 0.1  # the run's arguments
    assert summary.get("samples.nrows") == 4 and summary.get("samples.ncols") == 4  # the samples table (wandb.Table)


def test_trackio_local_store_holds_the_logged_metrics(world_root, tmp_path, monkeypatch):
    trackio = pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "nanorlhf-tests")
    run("train_reward.py", "--output_dir", tmp_path / "out", "--max_steps", 4, "--per_device_train_batch_size", 4,
        "--logging_steps", 2, "--report_to", "trackio", "--run_name", "rm")
    code = ("import json, trackio; print(json.dumps(trackio.SQLiteStorage.get_logs('nanorlhf-tests', 'rm')))")
    logs = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=dict(os.environ)).stdout.splitlines()[-1])
    for r in metrics(tmp_path / "out"):
        (got,) = [x for x in logs if x["step"] == r["step"] and all(k in x for k in r if k != "step")]
        assert all(got[k] == pytest.approx(v) for k, v in r.items())
    assert trackio  # imported only to skip when absent


def test_tracker_flags_are_checked_at_start(world_root, tmp_path, monkeypatch):
    out = ["--output_dir", tmp_path / "o", *RLOO]
    assert "--report_to mlflow: use none, wandb, tensorboard or trackio" in fails("train_rloo.py", *out, "--report_to",
                                                                                 "mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: refused before anything loads
    err = fails("train_ppo.py", *out, "--report_to", "tensorboard", "wandb")
    assert 'wandb is not installed; run pip install -e ".[wandb]"' in err and "prompts" not in err


# ----------------------------------------------------------------------------- LoRA
def _lora_args(**kw):
    return types.SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=[], **kw)


def test_reference_is_the_base_model(tiny_lm, tokenizer):
    # the adapter-off reference gives the base model's log-probs exactly, while the trained adapter moves the policy
    import copy
    import nanorlhf as nr
    pytest.importorskip("peft")
    base = copy.deepcopy(tiny_lm)
    policy = nr.add_lora(copy.deepcopy(tiny_lm), _lora_args(), "CAUSAL_LM")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained
    assert all(("lora_" in n) == p.requires_grad for n, p in policy.named_parameters())
    ref = nr.AdapterOff(policy)
    ids, mask = nr.pad([[4, 6, 9], [4, 7]], tokenizer.pad_token_id)
    tokens = torch.tensor([[10, 11, 12], [13, 14, 15]])
    with torch.no_grad():
        lp = {name: nr.completion_logprobs(m, ids, mask, tokens) for name, m in
              (("base", base), ("ref", ref), ("policy", policy))}
    assert torch.equal(lp["ref"], lp["base"]) and not torch.allclose(lp["policy"], lp["base"])
    assert sum(p.numel() for p in ref.parameters()) == 0  # no second copy


def test_lora_rloo_trains_the_adapter_only_and_round_trips(world_root, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    policy = os.path.join(world_root, "policy")
    run("train_rloo.py", "--output_dir", tmp_path / "a", *RLOO, "--use_peft", "--learning_rate", 3e-3)
    run("train_rloo.py", "--output_dir", tmp_path / "m", *RLOO, "--use_peft", "--learning_rate", 3e-3,
        "--merge_adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "a"))
    adapter = weights_of(tmp_path / "a" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter) and any(v.abs().sum() > 0 for k, v in adapter.items()
                                                                  if "lora_B" in k)
    # the merged model: the base's weights except the adapted projections (W + B A)
    base, merged = weights(policy), weights(tmp_path / "m")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # round trip: base + adapter (peft) == merged (transformers) == load_hf of the adapter folder
    ids = torch.tensor([[2, 4, 6, 9, 3]])
    with torch.no_grad():
        a = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy), tmp_path / "m" / "adapter")
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=1e-5)
    r = run("evaluate.py", "--model_name_or_path", tmp_path / "a", "--num_prompts", 8, "--max_new_tokens", 4,
            "--output_dir", tmp_path / "ev")
    assert "win rate" in r.stdout  # an adapter folder loads (its base from adapter_config.json, merged in)
    # a re-save (the same command run twice) replaces the adapter file by file: stopped midway (here: a folder
    # where a file comes), the folder still holds a whole adapter, never nothing
    from nanorlhf.models import _move_into
    (tmp_path / "new" / "adapter").mkdir(parents=True)
    (tmp_path / "new" / "adapter" / "adapter_model.safetensors").write_bytes(b"new")
    os.symlink("/nonexistent", tmp_path / "new" / "adapter" / "z")
    os.mkdir(tmp_path / "m" / "adapter" / "z")  # a folder where a file comes: the move fails there
    (tmp_path / "m" / "adapter" / "z" / "x").write_text("")
    with pytest.raises(OSError):
        _move_into(tmp_path / "new", tmp_path / "m")
    assert (tmp_path / "m" / "adapter" / "adapter_model.safetensors").read_bytes() == b"new"  # moved in before
    assert (tmp_path / "m" / "adapter" / "adapter_config.json").exists()  # the rest of the adapter still there


def weights_of(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_lora_reward_model(world_root, tmp_path):
    pytest.importorskip("peft")
    # reward model: adapter + score head (peft's modules_to_save) train; the RL scripts read the adapter folder
    run("train_reward.py", "--output_dir", tmp_path / "rm", "--max_steps", 3, "--per_device_train_batch_size", 4,
        "--use_peft")
    saved = weights_of(tmp_path / "rm" / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and any("lora_A" in k for k in saved)
    run("train_ppo.py", "--output_dir", tmp_path / "ppo", *RLOO, "--reward_model_path", tmp_path / "rm", "--use_peft")
    assert {"adapter_model.safetensors", "value_model"} <= set(os.listdir(tmp_path / "ppo"))


@pytest.mark.slow
def test_lora_kill_and_resume(world_root, tmp_path):
    # kill -9 and --resume: the adapter and its optimizer come back exactly
    pytest.importorskip("peft")
    common = [*RLOO, "--total_episodes", 240, "--save_steps", 3, "--use_peft", "--learning_rate", 3e-3]
    run("train_rloo.py", "--output_dir", tmp_path / "full", *common)
    kill_after("train_rloo.py", *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006")
    run("train_rloo.py", "--output_dir", tmp_path / "cut", "--resume", *common)
    a, b = (weights_of(tmp_path / d / "adapter_model.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_refusals(world_root, tmp_path, monkeypatch):
    out = ["--output_dir", tmp_path / "o", *RLOO, "--use_peft"]
    assert "drop --sft_model_path" in fails("train_rloo.py", *out, "--sft_model_path", os.path.join(world_root,
                                                                                                        "policy"))
    assert "--lora_r 0: must be > 0" in fails("train_rloo.py", *out, "--lora_r", 0)
    for targets, bad in ((["q_prj"], "q_prj"), (["q_proj", "v_prj"], "v_prj")):  # a typo beside a valid name too
        err = fails("train_rloo.py", *out, "--lora_target_modules", *targets)
        assert f"--lora_target_modules: {bad} match no module of LlamaForCausalLM (its linear layers: down_proj, " \
               "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)" in err, err
    monkeypatch.setitem(sys.modules, "peft", None)
    assert 'needs peft: pip install -e ".[peft]"' in fails("train_ppo.py", *out)


@pytest.mark.slow
def test_lora_under_ddp_and_fsdp_refused(world_root, tmp_path):
    pytest.importorskip("peft")
    run("train_xpo.py", "--output_dir", tmp_path / "ddp", "--per_device_train_batch_size", 4, "--max_steps", 2,
        "--max_new_tokens", 8, "--num_eval_prompts", 8, "--use_peft", procs=2)
    assert os.path.exists(tmp_path / "ddp" / "adapter_model.safetensors")
    r = run("train_rloo.py", "--output_dir", tmp_path / "fsdp", *RLOO, "--use_peft", "--fsdp", procs=2, check=False)
    assert r.returncode != 0 and "--use_peft with --fsdp" in r.stderr


@pytest.mark.slow
def test_default_sized_lora_run_raises_the_gold_reward(world_root, tmp_path):
    run("train_rloo.py", "--output_dir", tmp_path / "out", "--use_peft", "--learning_rate", 3e-3)
    evals = [r for r in metrics(tmp_path / "out") if "eval/gold_reward" in r]
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.1


def test_a_tracker_that_cannot_start_is_refused_before_the_old_run_is_deleted(world_root, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    import time
    from scripts import env
    out = tmp_path / "o"
    cmd = ["--output_dir", out, "--max_steps", 2, "--per_device_train_batch_size", 4]
    run("train_reward.py", *cmd)
    before = (out / "model.safetensors").read_bytes()
    import http.server
    import threading
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # 404 to wandb's API
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bare = {k: v for k, v in env().items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    cases = [("wandb", dict(HOME=str(tmp_path), WANDB_BASE_URL=f"http://127.0.0.1:{server.server_port}"),
              "--report_to wandb: cannot start ("),  # no API key: wandb.init's own error, in one line
             ("wandb", dict(WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9"),
              "--report_to wandb: cannot reach 127.0.0.1 ("),  # nothing listens
             ("wandb", dict(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{server.server_port}"),
              "--report_to wandb: cannot start ("),  # a server answers, not wandb's: wandb.init fails
             ("trackio", dict(TRACKIO_DIR="/proc/nanorlhf"), "--report_to trackio: cannot write its store /proc/")]
    for tracker, extra, message in cases:
        t = time.time()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train_reward.py"), *map(str, cmd), "--report_to", tracker,
                            "--overwrite_output_dir"], env={**bare, **extra}, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert time.time() - t < 60 and (out / "model.safetensors").read_bytes() == before  # nothing deleted
    server.shutdown()


def test_a_tracker_failing_mid_run_says_so_and_the_run_goes_on(tmp_path, monkeypatch):
    # wandb's run ends under the tracker (as when its service process dies): wandb.log raises from then on
    pytest.importorskip("wandb")
    import contextlib
    import dataclasses
    import io
    import nanorlhf as nr
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    Args = dataclasses.make_dataclass("Args", [("output_dir", str), ("report_to", list), ("run_name", str)])
    tracker = nr.Tracker(Args(str(tmp_path), ["wandb"], "x"))
    tracker.log({"step": 1, "loss": 1.0})
    tracker.open["wandb"].finish()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tracker.log({"step": 2, "loss": 0.5})
        tracker.log({"step": 3, "loss": 0.25})
    assert out.getvalue().count("--report_to wandb: stopped logging (Error: You must call wandb.init()") == 1, out
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3] and "wandb" not in tracker.open
    tracker.finish()
