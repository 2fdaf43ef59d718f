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


def test_demo_trains_end_to_end_on_a_reduced_setting(tmp_path, capsys):
    """The embedded default, shortened: real shards, real DeepSpeed training, real evaluation."""
    import json

    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--num-utterances", "480", "--minutes", "5", "-j", "2"]) == 0
    text = capsys.readouterr().out
    assert "untrained" in text and "tensorboard --logdir" in text
    summary = json.loads((out / "summary.json").read_text())
    # the trained model must clearly have learned to spell, not merely to stay silent (which scores CER 1.0)
    assert summary["trained"]["cer"] < 0.75 and summary["trained"]["cer"] < 0.5 * summary["untrained"]["cer"], summary
    assert (out / "run" / "model" / "model.safetensors").exists()
    assert list((out / "run" / "tensorboard").iterdir())
    # the n-gram step: an LM from the training transcripts, stored in the model, decoded with
    assert "+ 3-gram LM" in text and (out / "run" / "model" / "language_model" / "lm.arpa").exists()
    assert 0 <= summary["trained_with_lm"]["cer"] < 0.75, summary


def test_pictures(tmp_path, corpus_cache, capsys):
    import json

    from asr_dist.data.writer import BuildOptions, build

    build(BuildOptions(inputs=[corpus_cache("commonvoice", num=12)], output=str(tmp_path / "s"), progress=False))
    assert main(["shards", "info", str(tmp_path / "s"), "--plot", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train/loss": 5.0 / s, "train/lr": 1e-3 * min(1, s / 3)} for s in range(1, 10)]
    rows += [{"step": 5, "eval/dev/wer": 0.9, "eval/dev/cer": 0.5}, {"step": 9, "eval/dev/wer": 0.7, "eval/dev/cer": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
