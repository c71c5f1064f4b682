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
    assert digest == "4de27b135dc8e79e21f60c82038cd4daa2e41a321e41e109beb55179d7ac9f91"  # examples/data/hh-rlhf/SOURCE.md
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
        f.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}) + "\n")
        f.write(json.dumps({"prompt": "just text", "chosen": " yes", "rejected": " no"}) + "\n")
    with pytest.raises(SystemExit, match=r"pairs.jsonl.gz: pair 1 has no Human turn to answer"):
        _example().split(str(path), str(tmp_path / "out"), "half")
