"""asr_dist.plan: one plan of a run, which the Trainer and `train --dry-run` share."""

from __future__ import annotations

from pathlib import Path

import pytest

from asr_dist.config import ConfigError, load_config
from asr_dist.deepspeed_config import deepspeed_config
from asr_dist.errors import UserError
from asr_dist.models import FAMILIES, ModelError
from asr_dist.plan import load_run_config, plan_run

REPO = Path(__file__).resolve().parents[1]


def config(shards: Path, tmp_path: Path, *extra: str):
    return load_config(str(REPO / "configs" / "test.yaml"),
                       [f"output_dir={tmp_path / 'run'}", f"data.train_shards=[{shards / 's-train'}]",
                        f"data.eval_shards.dev={shards / 's-dev'}", "data.global_batch_size=8", "data.micro_batch_size=2",
                        "data.bucket_batches=4", "train.max_steps=null", "train.num_epochs=3", *extra])


def test_the_plan_holds_what_the_trainer_and_the_dry_run_use(train_shards, tmp_path):
    """96 utterances, global batch 8 of micro-batches of 2 on 2 ranks: 12 steps an epoch at accumulation 2;
    every rank's loader, the Trainer's and the dry run's alike, has every loader setting the config gives."""
    cfg = config(train_shards, tmp_path, "data.on_corrupt=skip", "data.pad_to_multiple_of=160")
    plan = plan_run(cfg, world_size=2)
    assert (plan.steps_per_epoch, plan.accumulation, plan.total_steps) == (12, 2, 36)
    assert plan.ds_config == deepspeed_config(cfg, 2, 36)
    assert plan.family is FAMILIES["wav2vec2"] and plan.model_config.vocab_size == len(plan.vocab)
    assert plan.model_config.mask_time_prob == 0.0  # the run's overrides are in the model config
    assert list(plan.eval_sets) == ["dev"] and plan.eval_sets["dev"].num_samples == 10
    for rank in (0, 1):
        loader = plan.loader(rank)
        assert (loader.rank, loader.world_size, loader.accumulation, loader.steps_per_epoch) == (rank, 2, 2, 12)
        assert (loader.bucket_batches, loader.length_plan, loader.on_corrupt, loader.pad_to_multiple_of) == (
            4, True, "skip", 160)
        assert loader.featurize is plan.featurize and loader.alignable is plan.alignable
    assert plan.loader(1) is plan.loader(1)
    text = plan.describe()
    assert '"gradient_accumulation_steps": 2' in text and "12 steps per epoch" in text and "36 steps in all" in text
    assert "evaluation sets: dev 10 utterances" in text
    assert text.splitlines()[-1] == ("every training utterance can be aligned by wav2vec2 tiny "
                                     "(no more CTC labels than frames)")


def test_the_plan_refuses_what_cannot_run_before_any_model_work(train_shards, tmp_path):
    with pytest.raises(UserError, match="micro batch sizes that divide it"):
        plan_run(config(train_shards, tmp_path, "data.micro_batch_size=3"), world_size=1)
    with pytest.raises(ConfigError, match="each rank would skip different layers"):
        plan_run(config(train_shards, tmp_path, "model.layerdrop=0.1", "model.sync_free_forward=false"), world_size=2)
    with pytest.raises(ConfigError, match="no metadata field dialect"):
        plan_run(config(train_shards, tmp_path, "eval.group_by=[dialect]"), world_size=1)
    other = tmp_path / "other-vocab"
    other.mkdir()
    for f in (train_shards / "s-dev").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "vocab.json").write_text('{"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3}')
    with pytest.raises(ConfigError, match="data.eval_shards.other: its vocab.json differs"):
        plan_run(config(train_shards, tmp_path, f"data.eval_shards.other={other}"), world_size=1)


def test_the_dry_run_of_a_packed_run_shows_its_capacities(train_shards, tmp_path):
    plan = plan_run(config(train_shards, tmp_path, "data.pack=true"), world_size=2)
    caps = plan.loader(0).capacities
    assert plan.pack_align == 320 and 1 <= len(caps) <= 8 and plan.loader(1).capacities == caps
    line = [x for x in plan.describe(check_alignment=False).splitlines() if x.startswith("packed micro-batches")]
    assert line == [f"packed micro-batches: each utterance on a multiple of 320 samples, at {len(caps)} capacities of "
                    + ", ".join(f"{c / 16000:.1f}" for c in caps) + " s of audio"]


def test_config_is_data_and_the_model_checks_are_the_plans(tmp_path):
    """load_config reads and merges; what a family cannot honour is refused by load_run_config (and plan_run)."""
    base = [f"output_dir={tmp_path}", "data.train_shards=[x]", "train.max_steps=1", "model.preset=tiny",
            "model.family=wav2vec2-bert", "model.compile=true"]
    assert load_config(None, base).model.compile
    with pytest.raises(ModelError, match="model.compile=true for wav2vec2-bert"):
        load_run_config(None, base)
