"""The asr-dist command: help that explains, errors without tracebacks, the demo's data half."""

from __future__ import annotations

import subprocess
import sys

from asr_dist.cli import main


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "asr_dist.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("shards", "demo"):
        assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "asr_dist.cli", "shards", "--help"], capture_output=True, text=True)
    for word in ("build", "verify", "info", "merge"):
        assert word in out.stdout


def test_danish_options_need_the_danish_normaliser(tmp_path, capsys):
    (tmp_path / "t.tsv").write_text("path\tsentence\n")
    assert main(["shards", "build", "-i", str(tmp_path / "t.tsv"), "-o", str(tmp_path / "o"),
                 "--normalizer", "basic", "--digits", "keep"]) == 2
    assert "only apply to --normalizer danish" in capsys.readouterr().err


def test_demo_builds_and_reuses(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--output", out, "--num-utterances", "30", "-j", "2"]) == 0
    first = capsys.readouterr().out
    assert "kept 30 utterances" in first and "duration histogram" in first
    assert main(["demo", "--output", out, "--num-utterances", "30", "-j", "1"]) == 0
    assert "already complete" in capsys.readouterr().out
