"""WER per metadata group: exact sums over groups, jiwer's rates, seeded bootstrap intervals."""

from __future__ import annotations

import random

import jiwer
import pytest

from asr_dist.metrics import NO_VALUE, ErrorCounts, bootstrap_interval, group_counts, group_report, utterance_counts


def corpus(n=60, seed=3):
    rng = random.Random(seed)
    words = "hej med dig det er godt vejr i dag".split()
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(n)]
    hyps = [" ".join(w if rng.random() > 0.2 * (i % 3) else rng.choice(words) for w in r.split()[: len(r.split()) - (i % 2)])
            for i, r in enumerate(refs)]
    genders = [("f", "m", None)[i % 3] for i in range(n)]
    return refs, hyps, genders


def test_groups_sum_to_the_whole_and_match_jiwer():
    refs, hyps, genders = corpus()
    counts = [utterance_counts(r, h) for r, h in zip(refs, hyps)]
    whole = ErrorCounts()
    whole.add(refs, hyps)
    groups = group_counts(genders, counts)
    assert set(groups) == {"f", "m", NO_VALUE}
    for f in ("word_edits", "ref_words", "char_edits", "ref_chars", "utterances", "substitutions"):
        assert sum(getattr(g, f) for g in groups.values()) == getattr(whole, f)
    for value in ("f", "m"):
        sel = [i for i, g in enumerate(genders) if g == value]
        assert groups[value].wer == pytest.approx(jiwer.wer([refs[i] for i in sel], [hyps[i] for i in sel]))
        assert groups[value].cer == pytest.approx(jiwer.cer([refs[i] for i in sel], [hyps[i] for i in sel]))


def test_bootstrap_is_seeded_and_brackets_the_rate():
    refs, hyps, genders = corpus(n=200)
    counts = [utterance_counts(r, h) for r, h in zip(refs, hyps)]
    a = bootstrap_interval(counts, seed=7, num_resamples=400)
    assert a == bootstrap_interval(counts, seed=7, num_resamples=400)
    assert a != bootstrap_interval(counts, seed=8, num_resamples=400)
    whole = ErrorCounts()
    whole.add(refs, hyps)
    lo, hi = a["wer"]
    assert lo < whole.wer < hi and hi - lo < 0.2
    # utterance order does not matter to the whole rate, and a perfect set has a zero-width interval
    assert bootstrap_interval([utterance_counts("a b", "a b")] * 5, seed=0)["wer"] == (0.0, 0.0)


def test_group_report_is_json_ready():
    import json

    refs, hyps, genders = corpus()
    counts = [utterance_counts(r, h) for r, h in zip(refs, hyps)]
    rep = group_report(genders, counts, seed=1, num_resamples=200)
    json.dumps(rep)
    assert rep["f"]["utterances"] == 20 and rep["f"]["wer_ci95"][0] <= rep["f"]["wer"] <= rep["f"]["wer_ci95"][1]


def test_group_table_reduced_over_ranks_is_exact_and_sums_to_the_whole():
    """What the evaluation during training does: each rank adds its utterances to a table laid out alike
    on every rank; the sum of the tables (the all-reduce) is the groups of the whole set, however split."""
    import torch

    from asr_dist.metrics import GroupTable, pooled_counts

    refs, hyps, genders = corpus()
    keys = [f"u{i:03d}" for i in range(len(refs))]
    dialects = [("Jysk", "Fynsk", "")[i % 4 % 3] for i in range(len(refs))]
    values = {k: {"gender": g, "dialect": d} for k, g, d in zip(keys, genders, dialects)}
    counts = {k: utterance_counts(r, h) for k, r, h in zip(keys, refs, hyps)}
    whole = ErrorCounts()
    whole.add(refs, hyps)
    t = GroupTable(["gender", "dialect"], values)
    assert t.groups == {"gender": [NO_VALUE, "f", "m"], "dialect": [NO_VALUE, "Fynsk", "Jysk"]}
    one = t.zeros()
    for k in keys:
        t.add(one, k, counts[k])
    parts = []
    for share in (keys[:5], keys[5:31], keys[31:]):  # three ranks, uneven shares; each its own table
        mine = GroupTable(["gender", "dialect"], values)
        part = mine.zeros()
        for k in share:
            mine.add(part, k, counts[k])
        parts.append(part)
    assert torch.equal(sum(parts), one)
    got = t.counts(one)
    for field, vals in (("gender", genders), ("dialect", dialects)):
        assert got[field] == group_counts(vals, list(counts.values()))
        assert pooled_counts(list(got[field].values())) == whole
    assert got["dialect"][NO_VALUE].utterances == sum(1 for d in dialects if d == "")


def test_pooled_counts_are_summed_edits_over_summed_words():
    from asr_dist.metrics import pooled_counts

    a, b = utterance_counts("hej med dig", "hej dig"), utterance_counts("godt vejr i dag igen", "godt vejr")
    p = pooled_counts([a, b])
    assert (p.word_edits, p.ref_words, p.utterances) == (4, 8, 2)
    assert p.wer == pytest.approx(4 / 8) and p.wer != pytest.approx((a.wer + b.wer) / 2)
