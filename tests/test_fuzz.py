"""The fuzz campaign (bench/fuzz.py) in small: a few hundred seeded mutations of real seed files per
reader of outside input, and every input it found crashing a reader (tests/fuzz/). Each must end in
success or the project's own error naming the input: never another exception, a hang or a blow-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import fuzz  # noqa: E402

FOUND = sorted((Path(__file__).parent / "fuzz").glob("*.bin"))


@pytest.fixture(scope="module")
def seeds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    fuzz.make_seeds_cached(root)
    return root


@pytest.mark.parametrize("path", FOUND, ids=[p.stem for p in FOUND])
def test_an_input_the_campaign_found_ends_in_a_clear_error(path, seeds_root, tmp_path):
    name = next(t for t in sorted(fuzz.targets(), key=len, reverse=True) if path.stem.startswith(t))
    seed = {**fuzz.make_seeds_cached(seeds_root)[name], "which": 0}
    outcome, detail = fuzz.classify(fuzz.targets()[name], path.read_bytes(), seed, tmp_path)
    assert outcome in ("success", "clear"), detail  # a manifest line that cannot be read is a reject: success


@pytest.mark.slow
@pytest.mark.parametrize("name", list(fuzz.targets()))
def test_a_few_hundred_mutations_end_in_success_or_a_clear_error(name, seeds_root):
    row = fuzz.run_target(name, 300, seeds_root, seed=1, timeout=10)
    assert row.cases == 300 and row.other == row.hang == row.memory == 0, row.failures[:3]
    if not name.startswith("manifest"):  # (a damaged manifest line is a reject: a success)
        assert row.clear > 0  # the mutations do reach the readers' checks
