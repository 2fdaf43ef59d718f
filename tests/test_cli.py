"""The asr-dist command: help that explains, errors without tracebacks, the demo's data half."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asr_dist.cli import main

REPO = Path(__file__).resolve().parents[1]


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


def test_only_the_projects_own_errors_are_short(tmp_path, capsys, monkeypatch):
    """A user's mistake: one line, exit 2. Any other exception is a bug and keeps its traceback."""
    from asr_dist import plots
    from asr_dist.config import ConfigError
    from asr_dist.data.index import ShardError
    from asr_dist.data.shardset import LoaderError
    from asr_dist.data.items import InputError
    from asr_dist.data.writer import BuildError
    from asr_dist.decode import ModelDirError
    from asr_dist.errors import UserError
    from asr_dist.lm import LMError

    for error in (ConfigError, ShardError, LoaderError, InputError, BuildError, ModelDirError, LMError):
        assert issubclass(error, UserError), error
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file; give the output_dir" in capsys.readouterr().err
    assert main(["train", "--config", str(REPO / "configs" / "test.yaml"), "output_dir=o", "data.train_shards=[s]",
                 "data.micro_batch_size=four", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "data.micro_batch_size takes a whole number or auto, not 'four', e.g. data.micro_batch_size=" in err

    def a_bug(*args, **kwargs):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(plots, "plot_run", a_bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["report", str(tmp_path)])


@pytest.mark.slow
def test_demo_trains_end_to_end_on_a_reduced_setting(tmp_path, capsys):
    """The embedded default, shortened: real shards, real DeepSpeed training, real evaluation. A fixed step
    count, not a time budget, so a slow or busy machine trains the same model (400 steps: CER 0.57 on 2 cores;
    the curve leaves 1.0 only after about 200 steps)."""
    import json

    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--num-utterances", "480", "--steps", "400", "-j", "2"]) == 0
    text = capsys.readouterr().out
    assert "untrained" in text and "tensorboard --logdir" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 400, summary
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


def test_report_draws_the_group_and_pooled_curves(tmp_path, capsys):
    """A run logged through the real writer (TensorBoard events + metrics.jsonl) with two evaluation sets,
    groups by speaker and gender, and the pooled rates: one panel per set and field, a line per group."""
    import json

    import matplotlib.image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asr_dist.evaluation import eval_scalars, set_result
    from asr_dist.logging import MetricWriter
    from asr_dist.metrics import pooled_counts, utterance_counts
    from asr_dist.plots import group_panels

    run = tmp_path / "run"
    w = MetricWriter(run)
    for step in range(1, 9):
        w.scalars(step, {"train/loss": 5.0 / step, "train/lr": 1e-3})
        if step % 4:
            continue
        hyp = "hej dig" if step == 4 else "hej med dig"
        per_set = {}
        for name, fields in (("dev", ("speaker", "gender")), ("test", ("gender",))):
            a, b = utterance_counts("hej med dig", hyp), utterance_counts("godt vejr", "godt vejr")
            per_set[name] = pooled_counts([a, b])
            groups = {f: ({"spk1": a, "spk2": b} if f == "speaker" else {"f": a, "m": b}) for f in fields}
            w.scalars(step, eval_scalars(name, set_result(1.0, per_set[name], groups)))
        w.scalars(step, eval_scalars("pooled", set_result(1.0, pooled_counts(list(per_set.values())))))
    w.close()
    assert main(["report", str(run)]) == 0
    assert "training curves drawn in" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    panels = group_panels(rows)
    assert list(panels) == ["dev WER by speaker", "dev WER by gender", "test WER by gender"]
    assert panels["dev WER by speaker"] == {"spk1": [(4, pytest.approx(1 / 3)), (8, 0.0)], "spk2": [(4, 0.0), (8, 0.0)]}
    # what the report draws is what TensorBoard holds
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tb = {t for t in ea.Tags()["scalars"] if "/wer_by_" in t}
    assert tb == {f"eval/{p.split()[0]}/wer_by_{p.split()[-1]}/{g}" for p, lines in panels.items() for g in lines}
    assert [e.step for e in ea.Scalars("eval/pooled/wer")] == [4, 8]
    assert ea.Scalars("eval/pooled/wer")[0].value == pytest.approx(2 / 10)
    # a second row of panels below the first (loss, learning rate, evaluation incl. pooled)
    tall = matplotlib.image.imread(str(run / "report.png")).shape[0]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "_by_" not in k}) + "\n"
                                                 for r in rows))
    assert main(["report", str(plain)]) == 0
    assert tall > 1.8 * matplotlib.image.imread(str(plain / "report.png")).shape[0]
