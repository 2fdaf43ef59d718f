"""The engine for real: DeepSpeed on CPU (gloo), two processes, synthesised shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from asr_dist.decode import evaluate_model
from trainkit import TAGS, WORKERS, dev_audio, greedy_transcript, launch, losses, overrides, save_initial_model


# the large-batch mode (micro-batches of up to 6 s of audio, 2 x 2 of them a step) in the ZeRO-1 run, read
# by a worker process
LARGE = ("data.micro_batch_seconds=6", "data.global_batch_seconds=24", WORKERS)


@pytest.mark.slow  # launches training
# ZeRO-2 trains in the LayerDrop test below, its losses equal to stage 0's at every step
@pytest.mark.parametrize("stage, launcher, mode", [(0, "torchrun", ()), (1, "deepspeed", LARGE), (3, "torchrun", ())])
def test_two_ranks_train_log_checkpoint_export(train_shards, tmp_path, stage, launcher, mode):
    out = tmp_path / "run"
    groups = group_overrides(train_shards) if stage == 0 else ()  # WER per speaker, two sets and their pooled rates
    args = overrides(train_shards, out, f"distributed.zero_stage={stage}", "train.max_steps=12", "eval.every_steps=6",
                     "train.checkpoint_every=6", *mode, *groups)
    r = launch(launcher, args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 13))
    # it trained: the final evaluation's held-out loss is below that of the model the run started from
    final = json.loads((out / "eval_results.json").read_text())
    untrained = evaluate_model(str(save_initial_model(args, tmp_path / "initial")), str(train_shards / "s-dev"),
                               micro_batch_size=4, num_workers=0, progress=False)
    assert final["step"] == 12 and final["eval"]["dev"]["loss"] < untrained["loss"], (final, untrained)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000006", "step-00000012"] and all((out / "checkpoints" / c / "COMPLETE").exists() for c in ckpts)
    assert "[rank 1/2]" in r.stderr  # every rank logs with its prefix; only rank 0 writes files
    if stage == 3:  # the export gathers the partitioned weights into one full model
        import transformers

        model = transformers.Wav2Vec2ForCTC.from_pretrained(str(out / "model"))
        assert sum(p.numel() for p in model.parameters()) > 1_000_000 and float(model.lm_head.weight.abs().sum()) > 0
    if stage == 0:
        check_groups_on_one_and_two_ranks(train_shards, out, tmp_path / "one")
    if stage != 0:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert set(TAGS) <= set(tags), set(TAGS) - set(tags)
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 13))
    lr = [e.value for e in ea.Scalars("train/lr")]
    assert max(lr) == pytest.approx(1e-3, rel=1e-6) and lr[-1] < lr[4]  # linear warmup, then decay
    # the evaluation during training (2 ranks, each half of the set) is `asr-dist evaluate`'s of the export
    # (one process), and its CER is below the untrained model's (which spells out noise)
    assert [e.step for e in ea.Scalars("eval/dev/wer")] == [6, 12]
    alone = evaluate_model(str(out / "model"), str(train_shards / "s-dev"), micro_batch_size=4, num_workers=0,
                           progress=False)
    for metric in ("wer", "cer", "loss"):
        assert ea.Scalars(f"eval/dev/{metric}")[-1].value == pytest.approx(alone[metric], rel=1e-5), metric
    assert final["eval"]["dev"]["counts"]["char_edits"] == alone["char_edits"]
    assert alone["cer"] < untrained["cer"], (alone, untrained)
    assert all(e.value > 0 for e in ea.Scalars("perf/audio_seconds_per_second"))
    # the export loads in a transformers pipeline, unchanged, which transcribes as the export's greedy decode
    import transformers

    asr = transformers.pipeline("automatic-speech-recognition", model=str(out / "model"), device="cpu")
    audio = next(iter(dev_audio(train_shards).values()))
    assert asr({"raw": audio, "sampling_rate": 16000})["text"] == greedy_transcript(out / "model", audio)
    card = (out / "model" / "README.md").read_text()
    assert "| 6 |" in card and "| 12 |" in card and "dev WER" in card
    assert json.loads((out / "model" / "asr_dist.json").read_text())["text_normalizer"]["name"] == "danish"


def group_overrides(shards) -> tuple[str, ...]:
    return ("eval.group_by=[speaker]", f"data.eval_shards.again={shards / 's-dev'}")


def check_groups_on_one_and_two_ranks(shards, out, one):
    """The evaluations of a 2-rank run with eval.group_by: each set's groups sum to the set, the pooled
    rates to the sets; the last evaluation done again during training on 1 rank (a resume of the final
    checkpoint, so the same weights) gives the same counts in every group."""
    two = json.loads((out / "eval_results.json").read_text())
    assert two["step"] == 12 and list(two["eval"]) == ["dev", "again", "pooled"]
    for name in ("dev", "again"):
        whole, groups = two["eval"][name]["counts"], two["eval"][name]["groups"]["speaker"]
        assert whole["utterances"] == 10 and set(groups) == {f"spk{i}" for i in range(7)}
        for k in whole:
            assert sum(g[k] for g in groups.values()) == whole[k], (name, k)
    assert two["eval"]["pooled"]["counts"] == {k: 2 * v for k, v in two["eval"]["dev"]["counts"].items()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/dev/wer_by_speaker/spk0" in r] == [6, 12]
    assert [r["step"] for r in rows if "eval/pooled/wer" in r] == [6, 12]
    assert "pooled WER" in (out / "model" / "README.md").read_text()
    shutil.copytree(out / "checkpoints", one / "checkpoints")
    r = launch("python", overrides(shards, one, "distributed.zero_stage=0", "train.max_steps=12",
                                   *group_overrides(shards)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already trained 12 of 12 steps" in r.stderr
    single = json.loads((one / "eval_results.json").read_text())
    for name in ("dev", "again", "pooled"):
        assert single["eval"][name]["counts"] == two["eval"][name]["counts"], name
        assert single["eval"][name].get("groups") == two["eval"][name].get("groups"), name


@pytest.mark.slow  # launches training
def test_single_process_skips_an_incomplete_checkpoint(train_shards, tmp_path):
    out = tmp_path / "run"
    args = ["train.max_steps=6", "train.checkpoint_every=3", "eval.every_steps=0", "data.eval_shards={}",
            "distributed.zero_stage=1", "train.profile_steps=[2,3]"]
    r = launch("python", overrides(train_shards, out, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    # train.profile_steps: a trace of steps 2-3 and a table of the top ops (on a GPU: kernels)
    assert sorted(p.name for p in (out / "profile").iterdir()) == ["rank0-steps2-3-top.txt", "rank0-steps2-3.json"]
    events = json.loads((out / "profile" / "rank0-steps2-3.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"aten::convolution", "aten::_ctc_loss", "Optimizer.step#AdamW.step"} <= names, sorted(names)[:50]
    assert "Self CPU" in (out / "profile" / "rank0-steps2-3-top.txt").read_text()
    # a save cut off by a kill or a full disk: files there, no COMPLETE marker
    last = out / "checkpoints" / "step-00000006"
    (last / "COMPLETE").unlink()
    for f in last.glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    # the run's resolved config is in the run directory; a resume with a key changed names it
    assert OmegaConf.load(out / "config.yaml").train.keep_checkpoints == 2
    r = launch("python", overrides(train_shards, out, *args, "train.keep_checkpoints=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ignoring incomplete checkpoint" in r.stderr and "resumed from" in r.stderr
    assert "step-00000003 at step 3" in r.stderr
    assert "1 config key(s) changed from the run's: train.keep_checkpoints: 2 -> 3" in r.stderr
    assert OmegaConf.load(out / "config.until-step-00000003.yaml").train.keep_checkpoints == 2
    assert OmegaConf.load(out / "config.yaml").train.keep_checkpoints == 3
    assert len(list((out / "profile").iterdir())) == 2  # resumed after the profiled steps: no second profile


@pytest.mark.slow  # launches training
def test_sync_free_forward_trains_as_transformers_forward_does(train_shards, tmp_path):
    """model.sync_free_forward (the default) against transformers' own forward in real runs: the same
    loss at every step with SpecAugment and dropout drawing random numbers, under ZeRO-3 (which must
    gather SpecAugment's embedding for a forward that is not its owner's)."""
    args = ["train.max_steps=4", "eval.every_steps=0", "train.checkpoint_every=0", "data.eval_shards={}",
            "distributed.zero_stage=3", "model.mask_time_prob=0.3", "model.mask_time_length=2",
            "model.hidden_dropout=0.1", "model.final_dropout=0.1"]
    runs = {}
    for sync_free in ("true", "false"):
        out = tmp_path / sync_free
        r = launch("python", overrides(train_shards, out, *args, f"model.sync_free_forward={sync_free}"))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[sync_free] = losses(out)
    assert len(runs["true"]) == 4
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-6)


@pytest.mark.slow  # launches training
def test_layerdrop_on_two_ranks_reduces_the_same_gradients_at_every_zero_stage(train_shards, tmp_path):
    """LayerDrop on 2 ranks: every rank skips the same layers (drawn from the seed and the step), so
    DeepSpeed's three gradient reductions (stage 0's all-reduce, ZeRO-1's and ZeRO-2's partitions) see
    the same parameters on both ranks, and train to the same losses (stage 0 reduces a zero gradient for
    a parameter without one). Without the shared draw, ZeRO 1/2 died at the first step ("Received data
    size doesn't match expected size")."""
    from asr_dist.models.ctc import layerdrop_draw

    args = ["train.max_steps=6", "eval.every_steps=0", "train.checkpoint_every=0", "data.eval_shards={}"]
    runs = {}
    for name, extra in {"stage0": ("distributed.zero_stage=0", "model.layerdrop=0.5"),
                        "stage2": ("distributed.zero_stage=2", "model.layerdrop=0.5"),
                        "no-layerdrop": ("distributed.zero_stage=0",)}.items():
        out = tmp_path / name
        r = launch("torchrun", overrides(train_shards, out, *args, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = losses(out)
    assert len(runs["stage0"]) == 6
    assert runs["stage2"] == pytest.approx(runs["stage0"], rel=1e-6)
    assert any(layerdrop_draw(0.5, 4, seed=0, step=0))  # the first step skips layers (configs/test.yaml: seed 0)...
    assert runs["stage0"][1] != pytest.approx(runs["no-layerdrop"][1], rel=1e-4)  # ...so its loss differs


def test_large_batch_mode_weighs_every_utterance_alike():
    """With micro-batches of varying utterance counts, a step's gradient does not depend on how its
    utterances were cut into micro-batches (padding is neutral for layer-norm wav2vec2s)."""
    from asr_dist.config import ModelArgs
    from asr_dist.step import utterance_weighted
    from asr_dist.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelArgs(preset="tiny", mask_time_prob=0.0), {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4})
    lengths = [4000, 5200, 6100, 7000, 9000, 12000]
    audio = [torch.randn(n) for n in lengths]
    labels = [torch.randint(2, 5, (3 + i,)) for i in range(6)]

    def step_gradient(cuts, mean_utterances):
        model.zero_grad()
        for a, b in cuts:
            t, l_max = max(lengths[a:b]), max(len(x) for x in labels[a:b])
            x, mask = torch.zeros(b - a, t), torch.zeros(b - a, t, dtype=torch.bool)
            y = torch.full((b - a, l_max), -100)
            for i in range(a, b):
                x[i - a, : lengths[i]], mask[i - a, : lengths[i]] = audio[i], True
                y[i - a, : len(labels[i])] = labels[i]
            loss = model(input_values=x, attention_mask=mask, labels=y).loss
            utterance_weighted(loss, b - a, mean_utterances).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = step_gradient([(0, 6)], 6.0)
    for cuts in ([(0, 4), (4, 6)], [(0, 1), (1, 6)], [(0, 2), (2, 4), (4, 6)]):
        got = step_gradient(cuts, 6.0)
        assert torch.allclose(got, whole, rtol=1e-4, atol=1e-6), (cuts, float((got - whole).abs().max()))
    # a plain mean per micro-batch (no weighting) gives the one utterance of (0, 1) a fifth of the step
    unweighted = step_gradient([(0, 1), (1, 6)], None)
    assert not torch.allclose(unweighted / 2, whole, rtol=1e-2, atol=1e-4)


@pytest.mark.slow
def test_a_weighted_mix_logs_each_sets_share(train_shards, tmp_path):
    """data.train_shards as {name: {path, weight}}: one epoch (13 steps of 8 of the mix's 106 utterances)
    draws 0.3 of its utterances from the 10-utterance set, and TensorBoard / metrics.jsonl show each set's
    share of utterances and of audio, summing to 1."""
    out = tmp_path / "run"
    mix = (f"data.train_shards={{train: {{path: {train_shards / 's-train'}, weight: 0.7}}, "
           f"dev: {{path: {train_shards / 's-dev'}, weight: 0.3}}}}")
    r = launch("python", [*overrides(train_shards, out, "train.max_steps=13", "eval.every_steps=0",
                                     "data.eval_shards={}"), mix])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [r for r in rows if "data/mix_utterance_share/dev" in r]
    assert len(shares) == 13
    for row in shares:
        for kind in ("utterance", "audio"):
            assert row[f"data/mix_{kind}_share/train"] + row[f"data/mix_{kind}_share/dev"] == pytest.approx(1.0)
    assert abs(shares[-1]["data/mix_utterance_share/dev"] - 0.3) <= 0.03, shares[-1]


def test_resume_on_another_world_size_keeps_the_skipped_sample_count(train_shards, tmp_path):
    """Damaged samples skipped by two ranks, resumed on one: train/skipped_samples (the sum over ranks)
    neither restarts from 0 nor counts rank 0's share for every rank."""
    from asr_dist.data.loader import TrainLoader
    from asr_dist.state import loader_state_for

    d = tmp_path / "s"
    shutil.copytree(train_shards / "s-train", d)
    for name in sorted(p.name for p in d.glob("shard-*.tar")):  # one sample's audio in each of the 12 shards
        data = bytearray((d / name).read_bytes())
        at = data.index(b"fLaC")
        data[at:at + 4] = b"XXXX"
        (d / name).write_bytes(bytes(data))
    kw = dict(micro_batch_size=2, global_batch_size=8, num_workers=0, on_corrupt="skip", bucket_batches=4)
    ranks = [TrainLoader(str(d), rank=r, world_size=2, **kw) for r in range(2)]
    for loader in ranks:
        list(loader)  # one epoch each
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in ranks]
    total = sum(loader.skipped_samples for loader in ranks)
    assert total == 12 and all(0 < loader.skipped_samples < total for loader in ranks)
    alone = TrainLoader(str(d), rank=0, world_size=1, **kw)
    alone.load_state_dict(loader_state_for(saved, 0, same_world=False))
    assert alone.skipped_samples == total
    list(alone)  # the next epoch meets the same twelve samples again
    assert alone.skipped_samples == 2 * total
    again = [TrainLoader(str(d), rank=r, world_size=2, **kw) for r in range(2)]
    for r, loader in enumerate(again):
        loader.load_state_dict(loader_state_for(saved, r, same_world=True))
    assert [loader.skipped_samples for loader in again] == [loader.skipped_samples for loader in ranks]
