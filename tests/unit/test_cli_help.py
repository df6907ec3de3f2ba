"""Every command and every option of ``fhirvault`` explains itself in ``--help``."""

from __future__ import annotations

import argparse

from fhirvault.cli.main import build_parser


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                if name not in helped:
                    missing.append(f"{path} {name} (command)")
                missing += _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_and_option_has_help() -> None:
    assert _walk(build_parser(), "fhirvault") == []


def test_the_walk_sees_options_without_help() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers()
    p = sub.add_parser("cmd")
    p.add_argument("--bare")
    assert _walk(parser, "x") == ["x cmd (command)", "x cmd --bare"]


def test_client_admin_commands_are_registered() -> None:
    parser = build_parser()
    for command in ("list", "disable", "enable", "rotate-secret"):
        argv = ["client", command, "--data-dir", "/d"] + ([] if command == "list" else ["--client-id", "fv-1"])
        args = parser.parse_args(argv)
        assert args.client_command == command
    assert parser.parse_args(["backup", "list", "--target", "file:///b", "--json"]).json is True
