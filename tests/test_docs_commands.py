"""Every `relay ...` command the docs tell an operator to type parses: an on-call engineer
copying a line from a runbook at night must not meet "unrecognized arguments"."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from relay.cli.commands import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A line of a shell code block that runs relay, up to a comment.
_LINE = re.compile(r"^\s*(?:sudo -u \S+ |\S+/)?(relay [a-z][^#\n]*)", re.M)
_BLOCK = re.compile(r"```([^\n]*)\n(.*?)```", re.S)


# Code spans that name something else: `relay bench`'s column for `relay serve --workers`.
NOT_COMMANDS = {"relay workers"}


def _commands(text: str) -> set[str]:
    """Code spans that are a relay command, and relay lines of shell code blocks."""
    blocks = [body for kind, body in _BLOCK.findall(text) if kind in ("sh", "console", "bash")]
    prose = _BLOCK.sub("", text)
    spans = prose.split("`")[1::2]  # between pairs of backticks
    found = [s for s in spans if s.startswith("relay ")]
    for body in blocks:
        found += _LINE.findall(body)
    return {c.strip() for c in found}


def _argv(command: str) -> list[str] | None:
    """The arguments to parse, placeholders filled; None for what is no full command."""
    command = re.split(r" \| | > | && |; ", command)[0]  # the relay part of a pipeline
    command = re.sub(r"\[[^\]]*\]", "", command)  # [filters], [--dry-run]: optional parts
    command = command.replace("--workers N", "--workers 2")
    command = command.replace("...", "").replace("$(date +%F)", "2026-12-01")
    command = re.sub(r"\$\(date [^)]*\)", "2026-12-01", command)
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if len(words) < 2 or words[1] in ("sendmail", "bench"):  # sendmail: its own parser
        return None
    if command in NOT_COMMANDS:
        return None
    return words[1:]


def test_the_scan_finds_the_runbook_commands() -> None:
    found = _commands((ROOT / "docs" / "runbooks.md").read_text())
    assert {"relay queue flush", "relay status"} <= found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_relay_commands_parse(doc: Path) -> None:
    parser = build_parser()
    bad = []
    for command in sorted(_commands(doc.read_text())):
        argv = _argv(command)
        if argv is None:
            continue
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                said = err.getvalue().strip().splitlines()[-1:] or [""]
                # A mention of a command without its arguments (`relay accounts test`)
                # is prose; an option or word the parser does not know is a wrong line.
                if exc.code and "are required" not in said[0]:
                    bad.append(f"{command}: {said[0]}")
    assert bad == []
