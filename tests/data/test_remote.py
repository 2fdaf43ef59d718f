"""Shard sets at URLs, read from real servers on the loopback interface: nginx (byte ranges), Python's
http.server (none), a server that drops connections and answers 503, moto's S3 server, and pipe: commands.
Every reader must deliver what it delivers from local disk."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from asr_dist.cli import main
from asr_dist.data import index as fmt
from asr_dist.data import remote
from asr_dist.data.eval_loader import EvalLoader
from asr_dist.data.loader import TrainLoader
from asr_dist.data.shardset import ShardSet
from asr_dist.data.verify import verify
from asr_dist.data.writer import BuildOptions, build
from asr_dist.errors import PathNotFound
from asr_dist.synth import write_corpus

sys.path.insert(0, str(Path(__file__).parents[1]))
from servers import NGINX, nginx, python_http, s3_server  # noqa: E402
from trainkit import launch, losses, overrides  # noqa: E402


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    """A web root with one shard set, www/set (48 utterances in 6 shards), and its corpus."""
    root = tmp_path_factory.mktemp("www")
    src = write_corpus(root / "corpus", "commonvoice", 48, seed=5)
    build(BuildOptions(inputs=[src], output=str(root / "www" / "set"), shard_size=8, progress=False))
    (root / "corpus.txt").write_text(str(src))
    return root


def _keys(shards, workers: int = 0, **kw) -> tuple[list, bool]:
    loader = TrainLoader(shards, rank=0, world_size=1, micro_batch_size=2, global_batch_size=4, num_workers=workers,
                         bucket_batches=4, **kw)
    return [b["keys"] for b in loader], loader.length_plan


def _audio(loader) -> dict:
    out = {}
    for b in loader:
        for i, k in enumerate(b["keys"]):
            out[k] = b["input_values"][i, :int(b["attention_mask"][i].sum())].numpy()
    return out


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_serves_the_length_plan_by_byte_ranges(www, tmp_path):
    local = str(www / "www" / "set")
    with nginx(www / "www", tmp_path / "nginx") as base:
        shards = ShardSet.open(f"{base}/set")
        assert shards.shards[0].fetch.ranges and shards.random_access
        assert _keys(shards, workers=2, length_plan=True) == _keys(local, workers=2, length_plan=True)
        log = (tmp_path / "nginx" / "access.log").read_text()
        assert " 206 " in log  # the samples were read by ranged GETs, not whole shards
        eval_url = EvalLoader(f"{base}/set", rank=0, world_size=1, micro_batch_size=4, num_workers=0)
        eval_local = EvalLoader(local, rank=0, world_size=1, micro_batch_size=4, num_workers=0)
        got, want = _audio(eval_url), _audio(eval_local)
        assert got.keys() == want.keys() and len(got) == 48
        assert all(np.array_equal(got[k], want[k]) for k in want)
        assert verify(f"{base}/set", progress=False) == []


def test_a_server_without_ranges_streams_whole_shards_and_says_so(www, caplog):
    local = str(www / "www" / "set")
    with python_http(www / "www") as (base, handler):
        shards = ShardSet.open(f"{base}/set")
        assert not shards.shards[0].fetch.ranges
        with caplog.at_level(logging.WARNING):
            got, planned = _keys(shards, workers=2, length_plan=True)
        assert not planned and "gives no byte ranges" in caplog.text and base in caplog.text
        assert (got, False) == _keys(local, workers=2, length_plan=False)
        # evaluation reads at offsets: a temporary copy, fetched once, the same audio
        got = _audio(EvalLoader(f"{base}/set", rank=0, world_size=1, micro_batch_size=4, num_workers=0))
        want = _audio(EvalLoader(local, rank=0, world_size=1, micro_batch_size=4, num_workers=0))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("ranges", [True, False])
def test_dropped_connections_and_503s_are_retried_and_change_nothing(www, ranges, caplog, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.05)
    local = str(www / "www" / "set")
    with python_http(www / "www", ranges=ranges, faults=("drop", "503")) as (base, handler):
        with caplog.at_level(logging.WARNING):
            got = _keys(ShardSet.open(f"{base}/set"), length_plan=False)
        assert got == _keys(local, length_plan=False)
        assert re.search(rf"{base}/set/shard-000000\.tar: reading from byte \d+ failed", caplog.text)
        assert "ClientPayloadError" in caplog.text and "503" in caplog.text
        assert handler.seen["/set/shard-000000.tar"] >= 3


def test_the_cache_fetches_each_shard_once_verified_and_keeps_no_partial(www, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.05)
    local = str(www / "www" / "set")
    cache = tmp_path / "cache"
    with python_http(www / "www", ranges=True, faults=("drop",)) as (base, handler):
        first = _keys(ShardSet.open(f"{base}/set", cache_dir=str(cache)), workers=2, length_plan=True)
        again = _keys(ShardSet.open(f"{base}/set", cache_dir=str(cache)), workers=2, length_plan=True)
        assert first == again == _keys(local, workers=2, length_plan=True)
        index = fmt.read_index(local)
        for s in index["shards"]:
            # a drop, then one whole fetch, whatever the number of workers and runs
            assert handler.seen[f"/set/{s['name']}"] == 2, s["name"]
            copy = cache / f"{s['sha256']}.tar"
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == s["sha256"]
        assert not list(cache.glob("*.partial"))


def test_a_shard_that_differs_from_index_json_stops_naming_the_url(www, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(www / "www" / "set", site / "set")
    shard = site / "set" / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # same size, another checksum
    shard.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with python_http(site) as (base, _):
        shards = ShardSet.open(f"{base}/set", cache_dir=str(cache))
        with pytest.raises(remote.RemoteError, match=r"shard-000003\.tar: its sha256 differs from index\.json"):
            _keys(shards, length_plan=True)
    assert not list(cache.glob(f"{fmt.read_index(site / 'set')['shards'][3]['sha256']}*"))
    assert not list(cache.glob(".*.partial"))


def test_the_cache_stays_under_its_size_by_evicting_the_least_recently_used(www, tmp_path):
    index = fmt.read_index(www / "www" / "set")
    sizes = [s["bytes"] for s in index["shards"]]
    limit = int(2.5 * max(sizes))
    with python_http(www / "www", ranges=True) as (base, _):
        shards = ShardSet.open(f"{base}/set", cache_dir=str(tmp_path / "cache"), cache_max_gb=limit / 1e9)
        assert len(_keys(shards, length_plan=False)[0]) == 24
    held = list((tmp_path / "cache").glob("*.tar"))
    assert 0 < len(held) <= 2 and sum(p.stat().st_size for p in held) <= limit
    with pytest.raises(remote.RemoteError, match="does not fit"):
        remote.ShardCache(tmp_path / "small", max_bytes=100).get(f"{base}/set/shard-000000.tar", sizes[0],
                                                                 index["shards"][0]["sha256"])


def test_a_missing_shard_stops_even_when_damage_is_skipped(www, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(www / "www" / "set", site / "set")
    (site / "set" / "shard-000002.tar").unlink()
    with python_http(site, ranges=True) as (base, _):
        for plan in (True, False):
            with pytest.raises(PathNotFound, match=r"shard-000002\.tar: not found \(404\)"):
                _keys(ShardSet.open(f"{base}/set"), length_plan=plan, on_corrupt="skip")
        with pytest.raises(PathNotFound, match="not a complete shard set"):
            ShardSet.open(f"{base}/nothing-here")


def test_a_dead_server_is_an_error_after_the_retries(www, monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 2)
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    with python_http(www / "www") as (base, _):
        pass  # stopped: nothing listens there now
    with pytest.raises(remote.RemoteError, match=r"index\.json: reading failed 3 times.*check the network"):
        ShardSet.open(f"{base}/set")


def test_resume_from_a_url_is_exact(www):
    with python_http(www / "www", ranges=True) as (base, _):
        args = dict(rank=0, world_size=1, micro_batch_size=2, global_batch_size=4, num_workers=0, bucket_batches=4,
                    length_plan=True)
        shards = ShardSet.open(f"{base}/set")
        whole = [b["keys"] for b in TrainLoader(shards, **args)]
        first = TrainLoader(shards, **args)
        it = iter(first)
        head = [next(it)["keys"] for _ in range(7)]
        state = first.state_dict()
        second = TrainLoader(shards, **args)
        second.load_state_dict(state)
        assert head + [b["keys"] for b in second] == whole


def test_pipe_commands_read_like_webdataset(www):
    local = str(www / "www" / "set")
    assert _keys(f"pipe:cat {local}/{{name}}", length_plan=False) == _keys(local, length_plan=False)
    with pytest.raises(remote.RemoteError, match=r"needs \{name\}"):
        ShardSet.open(f"pipe:cat {local}/index.json")


def test_s3_build_upload_read_and_verify(www, tmp_path, capsys):
    """moto's S3 server: `shards build --output s3://…` builds, verifies and uploads; the set reads back by
    ranged GETs as it does from disk."""
    local = str(www / "www" / "set")
    corpus = (www / "corpus.txt").read_text()
    with s3_server() as bucket:
        url = f"{bucket}/sets/cv"
        stage = tmp_path / "stage"
        args = ["shards", "build", "-i", corpus, "-o", url, "--shard-size", "8", "--no-progress",
                "--stage-dir", str(stage)]
        assert main(args) == 0
        assert not stage.exists()  # removed once the upload is whole
        uploaded = json.loads(remote.read_file(url, "index.json"))
        assert uploaded["shards"] == fmt.read_index(local)["shards"]  # the same shards, byte for byte
        shards = ShardSet.open(url)
        assert shards.shards[0].fetch.ranges
        assert _keys(shards, length_plan=True) == _keys(local, length_plan=True)
        assert main(["shards", "verify", url, "--no-progress"]) == 0
        assert main(["shards", "info", url]) == 0
        assert "48 utterances" in capsys.readouterr().out
        assert main(args + ["--shard-size", "4"]) == 2
        assert "already holds another shard set; pass --overwrite" in capsys.readouterr().err
        assert json.loads(remote.read_file(url, "index.json"))["shard_size"] == 8
        # a set built locally goes up the same way; merge refuses a URL and says what to do instead
        assert main(["shards", "upload", local, f"{bucket}/sets/local", "--no-progress"]) == 0
        assert "uploaded" in capsys.readouterr().out
        assert main(["shards", "upload", local, f"{bucket}/sets/local", "--no-progress"]) == 0
        assert "already holds this shard set" in capsys.readouterr().out
        assert ShardSet.open(f"{bucket}/sets/local").num_samples == 48
        assert main(["shards", "merge", local, "-o", f"{bucket}/sets/merged"]) == 2
        assert "shards upload DIR" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_training_reads_its_shards_from_urls(train_shards, tmp_path):
    """A run whose training set is at an nginx URL (fetched into data.cache_dir) and whose evaluation set is on
    a server without byte ranges trains, evaluates and exports (the loaders' batches from URLs equal those from
    disk: the tests above)."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("s-train", "s-dev"):
        (site / name).symlink_to(Path(train_shards) / name)
    run = tmp_path / "url"
    with nginx(site, tmp_path / "nginx") as base, python_http(site) as (plain, _):
        r = launch("python", overrides(Path(train_shards), run, "train.max_steps=3", "eval.every_steps=3",
                                       "distributed.zero_stage=0") + [
            f"data.train_shards=[{base}/s-train]", f"data.eval_shards.dev={plain}/s-dev",
            f"data.cache_dir={tmp_path / 'cache'}"])
        assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2, 3]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/dev/wer" in row]
    assert [row["step"] for row in evals] == [3] and 0 <= evals[0]["eval/dev/cer"] and evals[0]["eval/dev/loss"] > 0
    assert (run / "model" / "vocab.json").exists()  # the processor, from the vocabulary read at the URL
    # the training shards the 3 steps read, fetched on first use, and the evaluation set's
    fetched = {p.stem for p in (tmp_path / "cache").glob("*.tar")}
    sums = {name: {s["sha256"] for s in fmt.read_index(Path(train_shards) / name)["shards"]} for name in ("s-train", "s-dev")}
    assert fetched & sums["s-train"] and sums["s-dev"] <= fetched <= sums["s-train"] | sums["s-dev"]


def test_a_cut_short_shard_is_still_damage_to_skip(www, tmp_path):
    """A shard cut short on disk is damage that data.on_corrupt=skip skips (the length plan reads past its
    end), while an unreadable URL stops the run: the two are not confused."""
    site = tmp_path / "site"
    shutil.copytree(www / "www" / "set", site / "set")
    shard = site / "set" / "shard-000004.tar"
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    loader = TrainLoader(str(site / "set"), rank=0, world_size=1, micro_batch_size=2, global_batch_size=4,
                         num_workers=0, bucket_batches=4, length_plan=True, on_corrupt="skip")
    assert len([b["keys"] for b in loader]) == 24 and loader.skipped_samples > 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_a_pipe_left_before_its_end_closes_quietly(www):
    """A reader that takes what it needs and leaves (a unit that ends mid-shard) closes a pipe: command whose
    writer then fails (curl exits 23 on a closed pipe) without an error; one read to its end checks the status."""
    shard = www / "www" / "set" / "shard-000000.tar"
    stream = remote.Stream(f"pipe:curl -s file://{shard}", shard.stat().st_size)
    assert len(stream.read(100)) == 100
    stream.close()
    whole = remote.Stream(f"pipe:curl -s file://{shard}", shard.stat().st_size)
    assert whole.read() == shard.read_bytes()
    whole.close()
    failing = remote.Stream("pipe:cat /nonexistent/shard.tar", 1000)
    remote_retries, remote.RETRIES = remote.RETRIES, 1
    try:
        with pytest.raises(remote.RemoteError, match="failed 2 times"):
            failing.read(10)
    finally:
        remote.RETRIES = remote_retries
