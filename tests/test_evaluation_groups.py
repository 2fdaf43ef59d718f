"""WER per metadata group in `asr-dist evaluate --by`: exact group counts summing to the whole, the same
on 1 and 2 ranks, equal to jiwer on each group's predictions."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import jiwer
import pytest
import torch
import torch.multiprocessing as mp

from asr_dist.cli import main
from asr_dist.data.writer import BuildOptions, build
from asr_dist.decode import ModelDirError, evaluate_model
from asr_dist.distributed import DistEnv
from asr_dist.synth import write_corpus
from trainkit import save_random_model


@pytest.fixture(scope="module")
def model_and_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    src = Path(write_corpus(root / "corpus", "nemo", 13, seed=31))
    lines = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()]
    for i, e in enumerate(lines):  # NeMo's extra keys become fields; utterance 5 has no dialect
        e.update(gender="fm"[i % 2], **({"dialect": ("Fynsk", "Jysk", "Sjællandsk")[i % 3]} if i != 5 else {}))
    src.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines), encoding="utf-8")
    build(BuildOptions(inputs=[str(src)], output=str(root / "shards"), shard_size=4, progress=False))
    save_random_model(root / "shards", root / "model")
    return root


def _ranks(rank, world, port, root, out):
    torch.set_num_threads(1)
    evaluate_model(str(root / "model"), str(root / "shards"), report=str(out / "report.json"),
                   predictions=str(out / "pred.tsv"), micro_batch_size=3, num_workers=0,
                   denv=DistEnv(rank, rank, world, "127.0.0.1", port, "test"), progress=False,
                   group_by=["gender", "dialect"], seed=5)


@pytest.mark.slow
def test_groups_identical_on_1_and_2_ranks_and_equal_to_jiwer(model_and_set, tmp_path):
    root = model_and_set
    reports = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        out.mkdir()
        if world == 1:
            _ranks(0, 1, 0, root, out)
        else:
            mp.spawn(_ranks, args=(2, 29700 + os.getpid() % 200, root, out), nprocs=2, join=True)
        reports[world] = json.loads((out / "report.json").read_text())
    assert reports[1]["groups"] == reports[2]["groups"]
    rep = reports[1]
    rows = {r["key"]: r for r in csv.DictReader(open(tmp_path / "w1" / "pred.tsv", encoding="utf-8"), delimiter="\t")}
    for field in ("gender", "dialect"):
        groups = rep["groups"][field]
        for k in ("utterances", "ref_words", "word_edits", "char_edits", "substitutions", "deletions", "insertions"):
            want = rep["num_utterances" if k == "utterances" else "num_words" if k == "ref_words" else k]
            assert sum(g[k] for g in groups.values()) == want, (field, k)
        for g in groups.values():
            assert g["wer_ci95"][0] <= g["wer"] <= g["wer_ci95"][1]
    assert set(rep["groups"]["dialect"]) == {"Fynsk", "Jysk", "Sjællandsk", "(none)"}
    assert rep["groups"]["dialect"]["(none)"]["utterances"] == 1
    # each group's WER is jiwer's on that group's predictions
    from asr_dist.data import index as fmt

    gender = {}
    for shard in fmt.read_index(root / "shards")["shards"]:
        for loc in fmt.list_shard(root / "shards" / shard["name"]):
            gender[loc.key] = json.loads(loc.meta)["gender"]
    for value in ("f", "m"):
        sel = [r for k, r in rows.items() if gender[k] == value]
        assert rep["groups"]["gender"][value]["wer"] == pytest.approx(
            jiwer.wer([r["reference"] for r in sel], [r["hypothesis"] or "" for r in sel]), abs=1e-12)


def test_unknown_field_and_the_table(model_and_set, tmp_path, capsys):
    root = model_and_set
    with pytest.raises(ModelDirError, match=r"no metadata field age in its samples; fields there: dialect, gender"):
        evaluate_model(str(root / "model"), str(root / "shards"), num_workers=0, progress=False, group_by=["age"])
    assert main(["evaluate", "--model", str(root / "model"), "--shards", str(root / "shards"), "--by", "gender",
                 "--workers", "0", "--no-progress", "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "by gender:" in out and "95 % CI" in out
    groups = json.loads((tmp_path / "r.json").read_text())["groups"]["gender"]
    assert sum(g["utterances"] for g in groups.values()) == 13


def test_eval_group_by_a_field_the_eval_set_lacks_is_a_config_error(model_and_set, tmp_path):
    """eval.group_by is checked against index.json `fields` before any model work (also by --dry-run)."""
    from asr_dist.config import ConfigError, load_config
    from asr_dist.data.shardset import ShardSet
    from asr_dist.evaluation import check_group_fields

    root = model_and_set
    sets = {"dev": ShardSet.open(str(root / "shards"))}
    check_group_fields(["gender", "dialect"], sets)
    with pytest.raises(ConfigError, match=r"data\.eval_shards\.dev \(.*shards\) has no metadata field age; "
                                          r"fields there: dialect, gender"):
        check_group_fields(["gender", "age"], sets)
    repo = Path(__file__).resolve().parents[1]
    base = [f"output_dir={tmp_path}", f"data.train_shards=[{root / 'shards'}]"]
    for bad, why in ((["eval.group_by=[gender,gender]"], "distinct metadata field names"),
                     ([f"data.eval_shards.pooled={root / 'shards'}", f"data.eval_shards.dev={root / 'shards'}"],
                      "give this set another name")):
        with pytest.raises(ConfigError, match=why):
            load_config(str(repo / "configs" / "test.yaml"), base + bad)


def test_group_scalars_and_results_of_an_evaluation():
    """The tags and the eval_results.json entry of one set's evaluation with groups, and the pooled set."""
    from asr_dist.evaluation import eval_scalars, set_result
    from asr_dist.metrics import ErrorCounts, pooled_counts, utterance_counts

    f, m = utterance_counts("hej med dig", "hej dig"), utterance_counts("godt vejr i dag", "godt vejr i dag")
    whole = pooled_counts([f, m])
    r = set_result(1.5, whole, {"gender": {"f": f, "m": m}})
    assert r["groups"]["gender"]["f"]["wer"] == pytest.approx(1 / 3) and r["groups"]["gender"]["m"]["ref_words"] == 4
    assert r["utterances"] == 2 and r["counts"]["word_edits"] == 1
    tags = eval_scalars("dev", r)
    assert tags == {"eval/dev/loss": 1.5, "eval/dev/wer": pytest.approx(1 / 7), "eval/dev/cer": whole.cer,
                    "eval/dev/wer_by_gender/f": pytest.approx(1 / 3), "eval/dev/wer_by_gender/m": 0.0,
                    "eval/dev/cer_by_gender/f": f.cer, "eval/dev/cer_by_gender/m": 0.0,
                    "eval/dev/utterances_by_gender/f": 1, "eval/dev/utterances_by_gender/m": 1,
                    "eval/dev/words_by_gender/f": 3, "eval/dev/words_by_gender/m": 4}
    assert set(eval_scalars("pooled", set_result(1.0, ErrorCounts()))) == {"eval/pooled/loss", "eval/pooled/wer",
                                                                           "eval/pooled/cer"}


def test_a_split_of_a_hub_repository_is_evaluated_by_name(model_and_set, tmp_path):
    """`evaluate --split test --by gender` on a Hugging Face dataset repository as downloaded: the split's
    utterances, its gender groups; without --split the command says to choose one; a shard set has none."""
    import pyarrow.parquet as pq

    from asr_dist.errors import UserError

    root = model_and_set
    repo = write_corpus(tmp_path / "hub", "hf-hub", 16, seed=3)
    test_rows = [r for f in sorted(Path(repo).glob("data/test-*.parquet")) for r in pq.read_table(f).to_pylist()]
    with pytest.raises(UserError, match=r"splits train, test; choose one with --split"):
        evaluate_model(str(root / "model"), repo, num_workers=0, progress=False)
    assert main(["evaluate", "--model", str(root / "model"), "--shards", repo, "--split", "test", "--by", "gender",
                 "--workers", "0", "--no-progress", "--report", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_utterances"] == len(test_rows) > 0
    assert sum(g["utterances"] for g in r["groups"]["gender"].values()) == len(test_rows)
    with pytest.raises(ModelDirError, match=r"is a shard set, which has no subsets or splits"):
        evaluate_model(str(root / "model"), str(root / "shards"), num_workers=0, progress=False, split="test")


def _ranks_on_a_bad_split(rank, world, port, root, repo, out):
    torch.set_num_threads(1)
    from asr_dist.errors import UserError

    try:
        evaluate_model(str(root / "model"), repo, num_workers=0, progress=False, split="validation",
                       denv=DistEnv(rank, rank, world, "127.0.0.1", port, "test"))
    except UserError as e:
        (out / f"rank{rank}.txt").write_text(str(e))


@pytest.mark.slow
def test_a_corpus_rank_0_cannot_read_stops_every_rank_with_its_message(model_and_set, tmp_path):
    """Rank 0 builds a corpus into shards for all ranks; when that fails, the other ranks stop with the
    same message at once instead of waiting for a set that never comes."""
    repo = write_corpus(tmp_path / "hub", "hf-hub", 8, seed=3)
    mp.spawn(_ranks_on_a_bad_split, args=(2, 29500 + os.getpid() % 200, model_and_set, repo, tmp_path), nprocs=2,
             join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and "no split 'validation'" in messages[0]
