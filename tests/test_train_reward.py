"""train_reward.py end to end: 1 process, DDP, FSDP2, resume, margin, bad inputs."""
import json
import os

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertTokenizerFast,
                          LlamaConfig, LlamaForSequenceClassification)

from nanorlhf import bradley_terry_loss, pad, reward_model_scores
from scripts import fails, kill_after, metrics, run, weights

SCRIPT = "train_reward.py"
FAST = ["--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 16, "--logging_steps", 1]


def _check_output(out, world_root, steps):
    recs = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert any("eval/accuracy" in r for r in metrics(out))
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    before, after = weights(os.path.join(world_root, "policy")), weights(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key])  # the backbone was trained, not only the head
    assert json.load(open(os.path.join(out, "args.json")))["max_steps"] == steps
    return after


@pytest.mark.parametrize("procs, extra", [(1, []), (2, []), (2, ["--fsdp"])], ids=["1proc", "ddp", "fsdp"])
def test_two_steps(world_root, tmp_path, procs, extra):
    run(SCRIPT, "--output_dir", tmp_path / "out", "--max_steps", 2, *FAST, *extra, procs=procs)
    _check_output(str(tmp_path / "out"), world_root, 2)


def test_one_forward_equals_two_forwards():
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=1,
                                                    pad_token_id=0))
    chosen, rejected = [[4, 6, 8, 1], [4, 7, 9, 10, 11, 1]], [[4, 6, 12, 13, 14, 15, 1], [4, 7, 1]]
    ids, mask = pad(chosen + rejected, 0, "right")
    r = reward_model_scores(rm, ids, mask)
    one = bradley_terry_loss(r[:2], r[2:])
    c = reward_model_scores(rm, *pad(chosen, 0, "right"))
    rj = reward_model_scores(rm, *pad(rejected, 0, "right"))
    two = bradley_terry_loss(c, rj)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=0)
    g1 = torch.autograd.grad(one, rm.score.weight)[0]
    g2 = torch.autograd.grad(bradley_terry_loss(reward_model_scores(rm, *pad(chosen, 0, "right")),
                                                reward_model_scores(rm, *pad(rejected, 0, "right"))),
                             rm.score.weight)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def test_kill_and_resume_reproduces_the_uninterrupted_run(world_root, tmp_path):
    common = ["--max_steps", 40, "--save_steps", 4, *FAST, "--logging_steps", 3,  # a log window spans a checkpoint
              "--group_by_length"]  # and the length-grouped order is a function of the step
    run(SCRIPT, "--output_dir", tmp_path / "full", *common)
    kill_after(SCRIPT, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000008")
    assert not os.path.exists(tmp_path / "cut" / "model.safetensors")
    r = run(SCRIPT, "--output_dir", tmp_path / "cut", "--resume", *common)
    assert "resumed from" in r.stdout
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in full] == [r["step"] for r in cut]
    assert [r.get("loss") for r in full] == [r.get("loss") for r in cut]


def test_records_average_the_logging_window_and_log_the_rate_used(world_root, tmp_path):
    # as TRL (HF Trainer): a record's loss/accuracy/... are means over the steps since the last record;
    # lr is the rate the record's own update used (linear schedule over 4 steps from 1e-3: 1e-3, 7.5e-4, ...)
    run(SCRIPT, "--output_dir", tmp_path / "each", "--max_steps", 4, *FAST)
    run(SCRIPT, "--output_dir", tmp_path / "pairs", "--max_steps", 4, *FAST, "--logging_steps", 2)
    each = [r for r in metrics(tmp_path / "each") if "loss" in r]
    pairs = [r for r in metrics(tmp_path / "pairs") if "loss" in r]
    assert [r["lr"] for r in each] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert [r["step"] for r in pairs] == [2, 4] and [r["lr"] for r in pairs] == pytest.approx([7.5e-4, 2.5e-4])
    for key in ("loss", "accuracy", "margin", "rewards/chosen"):
        assert [r[key] for r in pairs] == pytest.approx([(each[0][key] + each[1][key]) / 2,
                                                         (each[2][key] + each[3][key]) / 2], abs=1e-6)


def test_margin_raises_the_loss(world_root, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(world_root, "preferences", "train.jsonl"))][:64]
    for name, m in (("plain", None), ("margin", 5.0)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(dict(r, margin=m) if m else r) + "\n" for r in rows)
        run(SCRIPT, "--dataset_name", tmp_path / f"{name}.jsonl", "--output_dir", tmp_path / name, "--max_steps", 1,
            *FAST, "--max_length", 64)
    plain, margin = (metrics(tmp_path / n)[0]["loss"] for n in ("plain", "margin"))
    # same init and batch: softplus(-(d - 5)) ~ 5 - d with d ~ 0 at init, against softplus(-d) ~ 0.69
    assert margin == pytest.approx(plain + 5 - 0.69, abs=0.1)


def test_dropout_is_off_unless_asked(tmp_path):
    # a BERT with dropout 0.5, learning rate 0, one batch of all 8 pairs: the train loss is the eval loss of the
    # same pairs exactly when dropout is off (TRL's default), and not with --disable_dropout false
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] happy gloomy cat tree good bad joy".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=1,
                                             hidden_dropout_prob=0.5)).save_pretrained(tmp_path / "bert")
    pairs = [{"prompt": f"{a} {b}", "chosen": "good joy", "rejected": "bad"}
             for a in ("happy", "gloomy") for b in ("cat", "tree", "joy", "bad")]
    for split in ("train", "test"):
        _bad(tmp_path, pairs, f"pairs/{split}.jsonl")
    for flag, equal in (([], True), (["--disable_dropout", "false"], False)):
        out = tmp_path / f"o{len(flag)}"
        run(SCRIPT, "--model_name_or_path", tmp_path / "bert", "--dataset_name", tmp_path / "pairs", "--output_dir",
            out, "--max_steps", 1, "--learning_rate", 0, "--per_device_train_batch_size", 8,
            "--per_device_eval_batch_size", 8, "--gradient_checkpointing", "false", "--max_length", 16, *flag)
        train, ev = metrics(out)[0]["loss"], metrics(out)[1]["eval/loss"]
        assert (abs(train - ev) < 1e-6) == equal, (train, ev)


def _bad(tmp_path, rows, name="bad.jsonl"):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _fails(*args, pythonpath=()):
    return fails(SCRIPT, *args, pythonpath=pythonpath)


def test_bad_inputs(world_root, tmp_path):
    out = ["--output_dir", tmp_path / "o"]
    err = _fails("--dataset_name", _bad(tmp_path, [{"prompt": "p", "chosen": "a"}]), *out)
    assert "bad.jsonl" in err and "missing ['rejected']" in err
    err = _fails("--dataset_name", _bad(tmp_path, [{"prompt": "p", "chosen": "", "rejected": "b"}]), *out)
    assert "row 0, field 'chosen': empty string" in err
    err = _fails("--max_length", 3, *out)
    assert "0 train pairs left after the length filter" in err
    err = _fails("--per_device_train_batch_size", 0, *out)
    assert "--per_device_train_batch_size 0: must be > 0" in err
    err = _fails("--learning_rat", 1e-3, *out)
    assert "unknown argument(s) --learning_rat" in err and "--learning_rate" in err
    two = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2, num_labels=2))
    two.save_pretrained(tmp_path / "two")
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(os.path.join(world_root, "policy")).save_pretrained(tmp_path / "two")
    err = _fails("--model_name_or_path", tmp_path / "two", "--dataset_name", os.path.join(world_root, "preferences"),
                 *out)
    assert "cannot load as a sequence classifier with one label" in err and "Pass a base model" in err


def test_output_dir_and_resume_guards(world_root, tmp_path):
    out = tmp_path / "o"
    run(SCRIPT, "--output_dir", out, "--max_steps", 2, "--save_steps", 1, *FAST)
    before = weights(out)
    err = _fails("--output_dir", out, "--max_steps", 2, *FAST, "--learning_rate", 0.5)  # another run's flags
    assert "holds an unfinished run, or one with other flags" in err and "--overwrite_output_dir" in err
    err = _fails("--output_dir", out, "--max_steps", 2, *FAST, "--learning_rate", 0.5, "--resume")
    assert "other settings" in err and "learning_rate" in err
    ckpt = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))[-1]
    with open(out / ckpt / "__0_0.distcp", "wb") as f:
        f.write(b"not a checkpoint")
    err = _fails("--output_dir", out, "--max_steps", 2, *FAST, "--resume")
    assert "cannot load checkpoint" in err and ckpt in err
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())  # the good model is untouched
    err = _fails("--output_dir", tmp_path / "empty", "--resume", *FAST)
    assert "no checkpoint" in err
