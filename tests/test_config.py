"""The dataclass -> CLI parser."""
from dataclasses import dataclass, field

import pytest

from nanorlhf import given_flags, parse_args


@dataclass
class Args:
    learning_rate: float = 5e-5
    """peak learning rate"""
    steps: int = 10
    """number of updates"""
    name: str = "run"
    """run name"""
    bf16: bool = False
    """bf16 autocast on GPU"""
    margin: float | None = None
    """optional margin"""
    models: list[str] = field(default_factory=list)
    """one or more folders"""


def test_forms_and_types():
    a = parse_args(Args, ["--learning_rate", "1e-6", "--steps=3", "--bf16", "--margin", "0.5"])
    assert a == Args(learning_rate=1e-6, steps=3, name="run", bf16=True, margin=0.5)
    assert parse_args(Args, ["--bf16", "false", "--margin=none"]).bf16 is False
    assert parse_args(Args, []) == Args() and Args().models == []
    assert parse_args(Args, ["--models", "runs/a", "runs/b", "--steps", "2"]).models == ["runs/a", "runs/b"]
    assert given_flags(["--steps=3", "--bf16", "x"]) == {"steps", "bf16"}


def test_unknown_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--lr", "1e-6"])
    err = capsys.readouterr().err
    assert "unknown argument(s) --lr" in err and "--learning_rate" in err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--steps", "three"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Args, ["--bf16", "maybe"])


def test_help_shows_docstrings(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--help"])
    out = capsys.readouterr().out
    assert "peak learning rate" in out and "default: 5e-05" in out
