"""Exact distributed WER/CER: 1, 2 and 3 ranks give identical counts, equal to jiwer on all pairs."""

from __future__ import annotations

import csv
import json
import os

import jiwer
import pytest
import torch
import torch.multiprocessing as mp

from asr_dist.cli import main
from asr_dist.decode import evaluate_model
from asr_dist.distributed import DistEnv
from asr_dist.data.writer import BuildOptions, build
from asr_dist.metrics import ErrorCounts, GreedyDecoder
from asr_dist.synth import write_corpus
from trainkit import save_random_model


@pytest.fixture(scope="module")
def model_and_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    src = write_corpus(root / "corpus", "nemo", 25, seed=21)  # 25 does not divide 2 or 3
    build(BuildOptions(inputs=[src], output=str(root / "shards"), shard_size=6, progress=False))
    save_random_model(root / "shards", root / "model")
    return root


def _ranks(rank, world, port, root, out, seconds=None):
    torch.set_num_threads(1)
    denv = DistEnv(rank, rank, world, "127.0.0.1", port, "test")
    evaluate_model(str(root / "model"), str(root / "shards"), report=str(out / "report.json"),
                   predictions=str(out / "pred.tsv"), micro_batch_size=4, num_workers=1, denv=denv, progress=False,
                   micro_batch_seconds=seconds)
    if world > 1:  # the group it started is ended: one left to the interpreter's exit can abort the rank in gloo
        assert not torch.distributed.is_initialized()


def _evaluate_and_check_against_jiwer(root, out, world: int, seconds: float | None = None) -> dict:
    """Evaluates the set on ``world`` ranks; checks the report against jiwer on its own predictions."""
    out.mkdir(parents=True, exist_ok=True)
    if world == 1:
        _ranks(0, 1, 0, root, out, seconds)
    else:
        mp.spawn(_ranks, args=(world, 29300 + os.getpid() % 300 + world, root, out, seconds), nprocs=world, join=True)
    report = json.loads((out / "report.json").read_text())
    rows = list(csv.DictReader(open(out / "pred.tsv", encoding="utf-8"), delimiter="\t"))
    assert len(rows) == 25 == report["num_utterances"] and len({r["key"] for r in rows}) == 25
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] or "" for r in rows]
    w, c = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
    assert report["wer"] == pytest.approx(w.wer, abs=1e-12) and report["cer"] == pytest.approx(c.cer, abs=1e-12)
    assert (report["substitutions"], report["deletions"], report["insertions"]) == (w.substitutions, w.deletions, w.insertions)
    assert report["substitutions"] > 0 and report["insertions"] + report["deletions"] > 0
    assert sum(int(r["word_errors"]) for r in rows) == report["word_edits"]
    return report


@pytest.fixture(scope="module")
def one_rank_report(model_and_set, tmp_path_factory):
    return _evaluate_and_check_against_jiwer(model_and_set, tmp_path_factory.mktemp("one-rank"), 1)


def test_one_rank_equals_jiwer(one_rank_report):
    assert one_rank_report["world_size"] == 1


# the last case batches by seconds of audio (asr-dist evaluate --batch-seconds): other batches, the same result
@pytest.mark.parametrize("world, seconds", [(2, None), pytest.param(3, None, marks=pytest.mark.slow),
                                            pytest.param(2, 6.0, marks=pytest.mark.slow)])
def test_identical_on_any_world_size_and_equal_to_jiwer(model_and_set, one_rank_report, tmp_path, world, seconds):
    report = _evaluate_and_check_against_jiwer(model_and_set, tmp_path, world, seconds)
    assert report["world_size"] == world
    for k in ("wer", "cer", "num_words", "substitutions", "deletions", "insertions", "word_edits", "char_edits"):
        assert report[k] == one_rank_report[k], k
    assert report["loss"] == pytest.approx(one_rank_report["loss"], rel=1e-9 if seconds is None else 1e-5)


def test_greedy_decoding():
    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4}
    ids = torch.tensor([[3, 3, 0, 3, 2, 2, 4, 0, 0, 4], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(ids, 5).float()
    assert GreedyDecoder(vocab)(logits, torch.tensor([10, 10])) == ["aa bb", ""]
    assert GreedyDecoder(vocab)(logits, torch.tensor([4, 10])) == ["aa", ""]


def test_counts_add_up():
    c = ErrorCounts()
    c.add(["a b c"], ["a x c d"])
    assert (c.substitutions, c.insertions, c.deletions, c.ref_words, c.wer) == (1, 1, 0, 3, 2 / 3)
    assert ErrorCounts.from_tensor(c.as_tensor()) == c


def test_evaluate_a_corpus_and_transcribe(model_and_set, tmp_path, capsys):
    root = model_and_set
    manifest = next((root / "corpus").glob("*.jsonl"))
    assert main(["evaluate", "--model", str(root / "model"), "--shards", str(manifest), "--report",
                 str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_utterances"] == 25
    wav = sorted((root / "corpus" / "audio").glob("*.wav"))[0]
    assert main(["transcribe", "--model", str(root / "model"), str(wav), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["audio"] == str(wav) and isinstance(line["text"], str) and line["duration"] > 0
    assert main(["evaluate", "--model", str(tmp_path), "--shards", str(root / "shards")]) == 2


def _ranks_on(rank, world, port, model, shards, out):
    torch.set_num_threads(1)
    denv = DistEnv(rank, rank, world, "127.0.0.1", port, "test")
    evaluate_model(model, shards, report=str(out / f"report-{world}.json"), micro_batch_size=4, num_workers=0,
                   denv=denv, progress=False)


@pytest.mark.slow  # 3 ranks
def test_a_rank_with_no_utterances(model_and_set, tmp_path):
    """2 utterances on 3 ranks: the third holds none, runs only filler batches, and the counts are exact."""
    root = model_and_set
    src = write_corpus(tmp_path / "corpus", "nemo", 2, seed=23)
    shards = tmp_path / "shards"
    build(BuildOptions(inputs=[src], output=str(shards), shard_size=1, progress=False,
                       vocab=str(root / "shards" / "vocab.json"), max_reject_fraction=1))
    _ranks_on(0, 1, 0, str(root / "model"), str(shards), tmp_path)
    mp.spawn(_ranks_on, args=(3, 29250 + os.getpid() % 40, str(root / "model"), str(shards), tmp_path), nprocs=3,
             join=True)
    one, three = (json.loads((tmp_path / f"report-{w}.json").read_text()) for w in (1, 3))
    assert one["num_utterances"] == three["num_utterances"] == 2
    for k in ("wer", "cer", "num_words", "substitutions", "deletions", "insertions"):
        assert three[k] == one[k], k


@pytest.mark.slow  # trains
@pytest.mark.parametrize("stage", [1, 3])
def test_evaluate_a_training_checkpoint_like_its_export(train_shards, tmp_path, stage):
    """`evaluate --model {output_dir}/checkpoints/step-N` rebuilds the model from the checkpoint (ZeRO-3
    partitions gathered) and scores exactly as the export of the same step."""
    from trainkit import launch, overrides

    out = tmp_path / "run"
    r = launch("python", overrides(train_shards, out, "train.max_steps=4", "train.checkpoint_every=0",
                                   "eval.every_steps=0", f"distributed.zero_stage={stage}"))
    assert r.returncode == 0, r.stderr[-3000:]
    dev = str(train_shards / "s-dev")
    from_export = evaluate_model(str(out / "model"), dev, num_workers=0, progress=False)
    ckpt = out / "checkpoints" / "step-00000004"
    from_ckpt = evaluate_model(str(ckpt), dev, num_workers=0, progress=False, report=str(tmp_path / "r.json"))
    for k in ("wer", "cer", "num_words", "substitutions", "deletions", "insertions"):
        assert from_ckpt[k] == from_export[k], k
    assert from_ckpt["loss"] == pytest.approx(from_export["loss"], rel=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["model"] == str(ckpt)
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        evaluate_model(str(ckpt), dev, num_workers=0, progress=False)
