"""Every command-line flag of every subcommand has help text that shows its default.

The parser is walked (subcommands and their subcommands); each action except ``--help`` must
have a help text, and the text ``--help`` prints for it names its default (``(default: ...)``),
unless the argument is required (a required positional or option has none).
"""

from __future__ import annotations

import argparse

import pytest

from hf_sparse.cli import _Formatter, build_parser


def actions(parser: argparse.ArgumentParser, path: str = "hf-sparse"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, parser, action


ACTIONS = list(actions(build_parser()))


def test_the_walk_reaches_every_subcommand():
    commands = {path for path, _, _ in ACTIONS}
    expected = ("prune", "mask golden", "merge", "analyze", "compress", "decompose", "eval", "push")
    assert all(f"hf-sparse {c}" in commands for c in expected)


@pytest.mark.parametrize(
    "path,parser,action", ACTIONS, ids=[f"{p} {a.option_strings or a.dest}" for p, _, a in ACTIONS]
)
def test_flag_has_help_showing_its_default(path, parser, action):
    assert action.help, f"{path}: {action.option_strings or action.dest} has no help text"
    assert isinstance(parser.formatter_class(path), _Formatter), f"{path} shows no defaults"
    text = parser.formatter_class(path)._get_help_string(action)
    required = action.required or (not action.option_strings and action.nargs is None)
    if not required:
        assert "default" in text, f"{path} {action.option_strings}: {text!r} names no default"
    if action.default not in (None, False, argparse.SUPPRESS) and "%(default)s" in text:
        assert str(action.default) in text % {"default": action.default}


def test_help_prints_for_every_subcommand(capsys):
    for path in sorted({p for p, _, _ in ACTIONS}):
        words = path.split()[1:]
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*words, "--help"])
        assert exit_.value.code == 0
        assert "(default:" in capsys.readouterr().out, path
