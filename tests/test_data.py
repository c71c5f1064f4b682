"""Data loading: every supported format gives the same pairs and prompts; every bad input its error."""
import gzip
import json
import os

import pytest
import torch

from nanorlhf import (InputError, MissingSplit, encode, epoch_order, held_out, load_rows, pad, preference_pairs,
                      prompts_of, tokenize_pairs, tokenize_prompts)

U = lambda s: [{"role": "user", "content": s}]  # noqa: E731
A = lambda s: [{"role": "assistant", "content": s}]  # noqa: E731
HH = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "hh-rlhf", "harmless-base-dev.jsonl.gz")


def _jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _ids(tokenizer, pairs):
    return tokenize_pairs(tokenizer, pairs, max_length=100)[0]


def test_conversational_explicit_and_implicit_agree(tmp_path, tokenizer):
    explicit = [{"prompt": U("happy cat"), "chosen": A("good joy"), "rejected": A("bad")},
                {"prompt": U("gloomy box hill"), "chosen": A("dark"), "rejected": A("kind nice")}]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a = preference_pairs(load_rows(_jsonl(tmp_path / "a.jsonl", explicit)), "a")
    b = preference_pairs(load_rows(_jsonl(tmp_path / "b.jsonl.gz", implicit, gzip.open)), "b")
    assert [p["prompt"] for p in b] == [r["prompt"] for r in explicit]
    assert _ids(tokenizer, a) == _ids(tokenizer, b)
    chosen_ids = _ids(tokenizer, a)[0][0]
    assert tokenizer.decode(chosen_ids) == "<|user|> happy cat <|assistant|> good joy <eos>"


def test_standard_explicit_implicit_hh_and_parquet_agree(tmp_path, tokenizer):
    import datasets
    explicit = [{"prompt": "\n\nHuman: happy cat\n\nAssistant:", "chosen": " good joy", "rejected": " bad"},
                {"prompt": "\n\nHuman: x\n\nAssistant: y\n\nHuman: gloomy\n\nAssistant:", "chosen": " dark",
                 "rejected": " dark cold"}]
    hh = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a = preference_pairs(load_rows(_jsonl(tmp_path / "a.jsonl", explicit)), "a")
    b = preference_pairs(load_rows(_jsonl(tmp_path / "hh.jsonl", hh)), "hh")  # shares " dark": cut at the marker
    datasets.Dataset.from_list(explicit).to_parquet(str(tmp_path / "c.parquet"))
    c = preference_pairs(load_rows(str(tmp_path / "c.parquet")), "c")
    strip = lambda ps: [(p["prompt"], p["chosen"], p["rejected"]) for p in ps]  # noqa: E731
    assert strip(a) == strip(b) == strip(c)
    ids = _ids(tokenizer, a)
    assert ids[0][0][-1] == tokenizer.eos_token_id  # standard completions get the EOS appended


def test_folder_splits_and_prompt_only(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": U("happy cat")}, {"prompt": U("gloomy box")}])
    _jsonl(tmp_path / "d" / "test.jsonl", [{"prompt": U("happy hill")}])
    train, test = load_rows(str(tmp_path / "d"), "train"), load_rows(str(tmp_path / "d"), "test")
    assert len(train) == 2 and prompts_of(test, "t") == [U("happy hill")]
    pref = load_rows(_jsonl(tmp_path / "p.jsonl", [{"prompt": U("happy cat"), "chosen": A("a"), "rejected": A("b")}]))
    assert prompts_of(pref, "p") == [U("happy cat")]
    rows, dropped = tokenize_prompts(tokenizer, prompts_of(train, "t") + [U("happy " + "cat " * 40)], 10)
    assert dropped == 1 and [i for i, _ in rows] == [0, 1]
    assert tokenizer.decode(rows[0][1]) == "<|user|> happy cat <|assistant|>"
    ids, mask = pad([r[1] for r in rows] + [[4, 5]], tokenizer.pad_token_id, "left")
    assert mask.tolist()[-1] == [0, 0, 1, 1] and ids[-1, 0].item() == tokenizer.pad_token_id


def test_margin_column(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}]
    assert preference_pairs(load_rows(_jsonl(tmp_path / "m.jsonl", rows)), "m")[0]["margin"] == 0.5


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "chosen": "a"}], r"missing \['rejected'\]"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": " ", "chosen": "a", "rejected": "b"}],
     r"row 1, field 'prompt': empty string"),
    ([{"prompt": "p", "chosen": 3, "rejected": "b"}], r"row 0, field 'chosen': expected a non-empty string"),
    ([{"prompt": "p", "chosen": [{"role": "assistant", "content": 1}], "rejected": "b"}], r"row 0, field 'chosen'"),
    ([{"chosen": "a", "rejected": "b"}], r"row 0, field 'prompt \(the shared prefix"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}], r"field 'margin'"),
    ([{"prompt": [{"role": "user", "content": " "}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}], r"row 0, field 'prompt': every message's content is empty"),
    ([{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                     "content": "b"}]}],
     r"row 0: 'prompt', 'chosen' and 'rejected' mix strings and messages"),
])
def test_bad_preference_rows(tmp_path, rows, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as e:
        preference_pairs(load_rows(path), path)
    assert "bad.jsonl" in str(e.value)


def test_identical_pairs_are_dropped_and_counted(tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"},
            {"chosen": "q same", "rejected": "q same"}]
    path = _jsonl(tmp_path / "ties.jsonl", rows)
    pairs = preference_pairs(load_rows(path), path)
    assert [p["rejected"] for p in pairs] == ["b"]
    out = capsys.readouterr().out
    assert "ties.jsonl: dropped 2 pairs whose chosen and rejected are identical (rows [1, 2])" in out


def test_bad_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl: line 2"):
        load_rows(str(tmp_path / "broken.jsonl"))
    with pytest.raises(InputError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_rows(str(tmp_path / "notes.txt"))
    with pytest.raises(MissingSplit, match="only the 'train' split"):
        load_rows(_jsonl(tmp_path / "one.jsonl", [{"prompt": "x"}]), "test")
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        prompts_of(load_rows(_jsonl(tmp_path / "q.jsonl", [{"question": "x"}])), "q.jsonl")


def test_over_long_pairs_are_dropped_and_counted(tokenizer):
    pairs = [{"prompt": U("happy cat"), "chosen": A("good"), "rejected": A("bad " * 30), "margin": None},
             {"prompt": U("happy cat"), "chosen": A("good"), "rejected": A("bad"), "margin": None}]
    rows, dropped, cut = tokenize_pairs(tokenizer, pairs, max_length=10)
    assert dropped == 1 and len(rows) == 1


def test_held_out_is_deterministic_by_prompt():
    prompts = [f"prompt {i}" for i in range(2000)]
    flags = [held_out(p, 0.1) for p in prompts]
    assert flags == [held_out(p, 0.1) for p in prompts]
    assert 150 < sum(flags) < 250
    assert held_out(U("a"), 0.5) == held_out([{"content": "a", "role": "user"}], 0.5)


def test_real_hh_rlhf_transcripts(tokenizer):
    pairs = preference_pairs(load_rows(HH), HH)
    assert len(pairs) == 2077
    assert all(p["prompt"].endswith("\n\nAssistant:") and p["prompt"].startswith("\n\nHuman:") for p in pairs)
    p_ids, c_ids = encode(tokenizer, pairs[0]["prompt"], pairs[0]["chosen"])
    assert c_ids[-1] == tokenizer.eos_token_id


def test_epoch_order_groups_by_length():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6]  # 9 rows, batches of 2: 4 batches, one row dropped
    plain = epoch_order(lengths, seed=3, global_batch=2)
    assert plain == torch.randperm(9, generator=torch.Generator().manual_seed(3)).tolist()  # the order without it
    grouped = epoch_order(lengths, seed=3, global_batch=2, group_by_length=True)
    assert sorted(grouped) == list(range(9)) and grouped[8] == plain[8]  # a permutation; the dropped row stays out
    kept = sorted((lengths[j] for j in plain[:8]), reverse=True)  # by hand: neighbours in length share a batch
    batches = [sorted(lengths[j] for j in grouped[b:b + 2]) for b in range(0, 8, 2)]
    assert sorted(batches) == sorted(sorted(kept[b:b + 2]) for b in range(0, 8, 2))
    assert grouped == epoch_order(lengths, seed=3, global_batch=2, group_by_length=True)  # a function of the seed
    assert {tuple(epoch_order(lengths, s, 2, True)[:2]) for s in range(8)} != {tuple(grouped[:2])}  # batches shuffled
    long = list(range(300))  # chunks of 50 global batches: sorted within a chunk, never across chunks
    order = epoch_order(long, seed=0, global_batch=2, group_by_length=True)
    first = torch.randperm(300, generator=torch.Generator().manual_seed(0)).tolist()[:100]
    assert sorted(order[:100]) == sorted(first)
