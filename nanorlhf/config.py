"""One small dataclass -> command line parser shared by every script.

`--name value` and `--name=value`; types from the annotations (int, float, str, bool, and
`X | None`); bools accept `--flag`, `--flag true|false`; `--help` prints each field's docstring
(the string literal under the field) and default; unknown flags are rejected with the valid list.
"""
import argparse
import ast
import dataclasses
import inspect
import sys
import types
import typing


def _docstrings(cls):
    """{field: docstring} from the string literal right below each annotated field."""
    body, docs = ast.parse(inspect.getsource(cls)).body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _bool(text):
    if text.lower() not in BOOLS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return BOOLS[text.lower()]


def _converter(tp):
    """(type function, is_bool) for an annotation; `X | None` also accepts the word 'none'."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        inner, _ = _converter(args[0])
        return (lambda s: None if s.lower() == "none" else inner(s)), False
    return (_bool, True) if tp is bool else (tp, False)


def parse_args(cls, argv=None, description=None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls`."""
    hints, docs = typing.get_type_hints(cls), _docstrings(cls)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        conv, is_bool = _converter(hints[f.name])
        extra = {"nargs": "?", "const": True} if is_bool else {}
        parser.add_argument(f"--{f.name}", type=conv, default=f.default, help=docs.get(f.name, " "),
                            metavar=f.name.upper() if not is_bool else "BOOL", **extra)
    ns, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        valid = " ".join(f"--{f.name}" for f in dataclasses.fields(cls))
        parser.error(f"unknown argument(s) {' '.join(unknown)}; valid flags: {valid}")
    return cls(**vars(ns))


def given_flags(argv=None):
    """Names of the flags present on the command line (so built-in defaults never override them)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
