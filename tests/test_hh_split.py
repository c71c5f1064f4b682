"""examples/hh_smollm2.py's data (shipped, checksummed) and its split of the real hh-rlhf pairs: no conversation in
two parts, TRL's conversational format, the reward model's and the judge's pairs as --judge says."""
import importlib.util
import json
import os

import pytest

from scripts import ROOT

HH = os.path.join(ROOT, "examples", "data", "hh-rlhf", "harmless-base-dev.jsonl.gz")


def _example():
    spec = importlib.util.spec_from_file_location("hh_smollm2", os.path.join(ROOT, "examples", "hh_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(out, folder, split):
    with open(os.path.join(out, folder, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_shipped_pairs_are_the_documented_file():
    import hashlib
    with open(HH, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    # the digest SOURCE.md in examples/data/hh-rlhf gives
    assert digest == "4de27b135dc8e79e21f60c82038cd4daa2e41a321e41e109beb55179d7ac9f91"
    with open(os.path.join(os.path.dirname(HH), "SOURCE.md")) as f:
        assert digest in f.read()
    with open(os.path.join(os.path.dirname(HH), "LICENSE")) as f:
        assert f.read().startswith("MIT License") and _example().HH == HH


@pytest.mark.parametrize("judge", ["seed", "half"])
def test_split(tmp_path, judge):
    hh = _example()
    counts = hh.split(HH, str(tmp_path), judge)
    assert sum(counts.values()) == 2077 - 3  # three pairs with an empty answer dropped
    first = lambda rows: {r["prompt"][0]["content"] for r in rows}  # noqa: E731
    rm, jd, test = _rows(tmp_path, "rm", "train"), _rows(tmp_path, "judge", "train"), _rows(tmp_path, "rm", "test")
    assert not first(rm + jd) & first(test)  # a first Human turn is never both trained on and held out
    assert len(test) == counts["test"] and _rows(tmp_path, "judge", "test") == test
    assert len(_rows(tmp_path, "prompts", "train")) == counts["a"] + counts["b"]
    if judge == "seed":
        assert rm == jd and len(rm) == counts["a"] + counts["b"]
    else:
        assert (len(rm), len(jd)) == (counts["a"], counts["b"]) and not first(rm) & first(jd)
    for r in rm[:50]:
        assert r["prompt"][0]["role"] == "user" and r["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in r["chosen"] + r["rejected"]] == ["assistant", "assistant"]
        assert all(m["content"] and "Human:" not in m["content"] for m in r["prompt"] + r["chosen"])


def test_messages_of_a_transcript():
    hh = _example()
    pair = {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I\n\nsteal a car?\n\nAssistant:",
            "chosen": " I can't help with that.", "rejected": " First, find a car."}
    assert hh.messages(pair) == {
        "prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "How do I\n\nsteal a car?"}],
        "chosen": [{"role": "assistant", "content": "I can't help with that."}],
        "rejected": [{"role": "assistant", "content": "First, find a car."}]}
    assert hh.messages(hh.messages(pair)) == hh.messages(pair)  # messages pass as they are


def test_a_pair_without_human_turns_is_refused_at_the_input(tmp_path):
    import gzip
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        pair = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
        f.write(json.dumps(pair) + "\n")
        f.write(json.dumps({"prompt": "just text", "chosen": " yes", "rejected": " no"}) + "\n")
    with pytest.raises(SystemExit, match=r"pairs.jsonl.gz: pair 1 has no Human turn to answer"):
        _example().split(str(path), str(tmp_path / "out"), "half")


@pytest.mark.parametrize("stop", ["sigterm", "a failed job"])
def test_a_stopped_pipeline_stops_the_jobs_it_started(tmp_path, stop):
    # the example runs each stage as a process: when the example stops (a scheduler's SIGTERM, a job beside that
    # failed), a training job must not run on unseen, holding the CPU and writing into the output folder
    import signal
    import subprocess
    import sys
    import time
    pidfile, sleeper, failer = tmp_path / "pid", tmp_path / "sleeper.py", tmp_path / "failer.py"
    sleeper.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    failer.write_text(f"import os, time\nwhile not os.path.exists({str(pidfile)!r}): time.sleep(0.05)\n"
                      "raise SystemExit(3)\n")
    jobs = [(str(sleeper), [], str(tmp_path / "sleeper.log"))]
    if stop == "a failed job":
        jobs.append((str(failer), [], str(tmp_path / "failer.log")))
    driver = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'examples')!r}); import hh_smollm2; "
              f"hh_smollm2.sh(*{jobs!r})")
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (143 if stop == "sigterm" else 1)
        assert stop == "sigterm" or "failer.py failed" in err
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the sleeping job is gone
    finally:  # whatever happened, nothing of this test runs on
        proc.kill()
        subprocess.run(["pkill", "-f", str(sleeper)])


def test_each_report_reads_the_evaluations_as_they_are_now(tmp_path):
    # the pipeline rewrites report.md after every run's evaluation; a stage redone since the last report (--redo
    # rewrites an evaluation in place) must show its new numbers, not the ones read before
    hh = _example()
    for name in ("rm", "judge"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"eval/accuracy": 0.6, "eval/pairs": 150}) + "\n")

    def evaluation(win):
        for name in ("rm", "judge"):
            folder = tmp_path / "runs" / "rloo-seed1" / f"eval_{name}"
            os.makedirs(folder, exist_ok=True)
            result = {"win_rate": win, "win_rate_ci": [win - 0.1, win + 0.1], "score_diff": 0.1,
                      "score_diff_ci": [0.0, 0.2], "kl_k1": 1.0, "length": 40.0, "baseline_length": 50.0, "eos": 0.5,
                      "baseline_eos": 0.3, "score": 0.2, "baseline_score": 0.1}
            (folder / "eval.json").write_text(json.dumps({"results": [result]}))
            sample = {"outcome": win, "eos": True, "baseline_eos": True, "score": 0.2, "baseline_score": 0.1,
                      "prompt": "p", "completion": "c", "baseline_completion": "b"}
            (folder / "eval_samples.jsonl").write_text(json.dumps(sample) + "\n")

    counts = {"a": 1, "b": 1, "test": 1}
    evaluation(0.25)
    hh.report(str(tmp_path), "half", counts, {})
    assert "| rloo | 1 | 0.250 [0.150, 0.350]" in (tmp_path / "report.md").read_text()
    evaluation(0.75)
    hh.report(str(tmp_path), "half", counts, {})
    assert "| rloo | 1 | 0.750 [0.650, 0.850]" in (tmp_path / "report.md").read_text()
