"""README.md and docs/: short, every link resolves, and every command in them parses: its script, module or
config exists, its flags are the command's own and its config keys validate (the commands need GPUs and the hub
to run in full; what a typo would break is checked here)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ncp.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(md: Path) -> list[str]:
    """Command lines of the file's bash blocks: continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


class Parsed(Exception):
    pass


def check_command(line: str, monkeypatch) -> None:
    words = shlex.split(line)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:2] == ["accelerate", "launch"]:
        words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
    if words[0] == "bash" or words[0].startswith("scripts/"):
        script = words[1] if words[0] == "bash" else words[0]
        assert (ROOT / script).is_file(), line
        return
    if words[0] != "python":
        return  # tensorboard, `. .venv/bin/activate`, ...
    if words[1].startswith("train_ncp_"):
        loss = words[1].removeprefix("train_ncp_").removesuffix(".py")
        args = words[2:]
        assert args[0] == "--config" and (ROOT / args[1]).is_file(), line
        load_config(str(ROOT / args[1]), [a for a in args[2:] if "=" in a], **{"objective.loss": loss})
        return
    if words[1] == "-m":
        module = importlib.import_module(words[2])
        original = argparse.ArgumentParser.parse_args

        def parse_only(self, args=None, namespace=None):
            raise Parsed(original(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with pytest.raises(Parsed):
            module.main(words[3:])
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
        return
    assert (ROOT / words[1]).is_file(), line  # python benchmarks/x.py


def test_readme_is_a_short_guide_that_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12_500
    first = re.search(r"```bash\n(.*?)```", text, re.S)[1]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == \
        ["bash scripts/quickstart.sh", "bash scripts/test.sh"]


@pytest.mark.parametrize("md", DOCS, ids=[p.name for p in DOCS])
def test_links_resolve_and_commands_parse(md, monkeypatch):
    for target in re.findall(r"\]\(([^)#\s]+)\)", md.read_text()):
        if not target.startswith("http"):
            assert (md.parent / target).exists(), f"{md.name}: broken link {target}"
    for line in commands(md):
        check_command(line, monkeypatch)


def test_no_pointers_outside_the_repository():
    """Project files speak of the project's own docs (docs/method.md), not of notes kept elsewhere."""
    proc = subprocess.run(["git", "grep", "-n", "-F", "-e", "method-notes", "-e", "../shared", "--", ".", ":!tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout == "", proc.stdout
