"""Shared fixtures: synthesised Danish corpora in every input layout, built once per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from asr_dist.synth import write_corpus

sys.path.insert(0, str(Path(__file__).parent))  # tests/trainkit.py, for tests in any folder below
from trainkit import make_train_shards  # noqa: E402

# a rank or tool that crashes in a test (SIGSEGV, SIGABRT, …) prints every thread's Python stack
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    made: dict = {}

    def get(layout: str, num: int = 20, seed: int = 0, sample_rate: int = 22050, channels: int = 1,
            audio_format: str = "wav") -> str:
        spec = (layout, num, seed, sample_rate, channels, audio_format)
        if spec not in made:
            d = root / "-".join(map(str, spec))
            made[spec] = write_corpus(d, layout, num, seed=seed, sample_rate=sample_rate, channels=channels,
                                      audio_format=audio_format)
        return made[spec]

    return get


@pytest.fixture
def corpus(corpus_cache, tmp_path):
    """A private copy of a cached corpus (tests may damage it): corpus(layout, **spec) -> input path."""

    def get(layout: str, **spec) -> str:
        src = corpus_cache(layout, **spec)
        src_root = Path(src) if Path(src).is_dir() else Path(src).parent
        dst_root = tmp_path / f"corpus-{layout}-{len(list(tmp_path.glob('corpus-*')))}"
        shutil.copytree(src_root, dst_root)
        return str(dst_root / Path(src).name) if Path(src).is_file() else str(dst_root)

    return get


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """Shards to train on: root/s-train (96 utterances) and root/s-dev (10 held out), shards of 8."""
    return make_train_shards(tmp_path_factory.mktemp("engine"))
