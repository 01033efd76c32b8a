"""Every command the README and docs/ show is one the project accepts as written: each
`uv run src/imt_ml/<script>.py ...` line parses against that script's real command line
(its subcommand and every flag), and each `uv run task <name>` names a Taskfile task.
Running them all would take hours; what breaks a copied command is a renamed script,
subcommand or flag, and that is what this checks."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "development.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def documented(pattern: str) -> list[tuple[str, list[str]]]:
    """(doc file, the words after the match) of every documented command matching `pattern`."""
    found = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            m = re.search(pattern, line)
            if m:
                words = shlex.split(line[m.end() :].split("|", 1)[0].split("&&", 1)[0])
                found.append((doc.name, [m.group(1), *words]))
    return found


SCRIPTS = documented(r"uv run (?:python )?src/imt_ml/(\w+)\.py")
TASKS = documented(r"uv run task ([\w-]+)")


def parse(command: click.Command, words: list[str]) -> None:
    """Parse `words` as the command line would, down to the subcommand; a missing file
    is not an error here (the examples name files of the reader's own)."""
    try:
        ctx = command.make_context(command.name or "cli", list(words), resilient_parsing=False)
        if isinstance(command, click.Group):
            rest = ctx.protected_args + ctx.args
            if rest:
                name, sub, args = command.resolve_command(ctx, rest)
                sub.make_context(name, args, parent=ctx)
    except click.BadParameter as exc:
        if not any(s in str(exc) for s in ("does not exist", "is not a", "No such file")):
            raise


@pytest.mark.parametrize(("doc", "words"), SCRIPTS, ids=[" ".join(w)[:60] for _, w in SCRIPTS])
def test_documented_script_commands_parse(doc, words):
    script, *args = words
    module = importlib.import_module(f"imt_ml.{script}")
    command = getattr(module, "cli", None) or module.main
    words = [w for w in args if not re.fullmatch(r"\$\{?\w+\}?", w)]
    try:
        parse(command, words)
    except click.exceptions.Exit:
        pass  # --help


def test_documented_tasks_exist():
    taskfile = (REPO / "Taskfile.yml").read_text()
    tasks = set(re.findall(r"^  ([\w-]+):$", taskfile, re.M))
    assert len(TASKS) > 10
    missing = sorted({f"{doc}: task {words[0]}" for doc, words in TASKS if words[0] not in tasks})
    assert not missing, missing
