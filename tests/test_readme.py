"""The README's commands, extracted from it: an edit that breaks one fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from asr_dist.cli import make_parser

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#") and not line.startswith("."):
                commands.append(line)
    return commands


def test_the_two_commands_at_the_top_are_make_targets():
    top = readme_commands()[:2]
    assert top == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", [c for c in readme_commands() if not c.startswith("make ")])
def test_every_command_parses(command):
    words = [w for w in shlex.split(command) if w != "…"]
    if words[0] == "sudo":
        words = words[1:]
    if words[:2] == ["pip", "install"]:  # an extra this project declares
        extras = re.findall(r"asr-dist\[(\w+)\]", command)
        assert extras and all(re.search(rf"^{e} =", (REPO / "setup.cfg").read_text(), re.M) for e in extras), command
        return
    if words[0] == "bash":
        assert (REPO / words[1]).exists(), words[1]
        return
    if words[0] == "sbatch":  # sbatch [options] slurm/X.sbatch CONFIG [overrides]: the script runs train with them
        script = next(w for w in words if w.endswith(".sbatch"))
        assert (REPO / script).exists(), script
        rest = words[words.index(script) + 1:]
        args = ["train", "--config", *rest] if "train" in Path(script).name else None
        if args is None:
            return
    elif words[0] == "asr-dist":
        args = words[1:]
    else:  # a launcher: deepspeed / torchrun / python in front of one of our entry scripts
        script = next(w for w in words if w.endswith(".py"))
        assert (REPO / script).exists(), script
        sub = {"train.py": "train", "evaluate.py": "evaluate", "transcribe.py": "transcribe", "build.py": "shards"}
        name = Path(script).name
        args = ([sub[name]] + (["build"] if name == "build.py" else [])) + words[words.index(script) + 1:]
    try:
        make_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"README command does not parse ({e}): {command}")
