"""`asr-dist shards verify` and `asr-dist shards info`.

verify decodes every sample and checks it against its JSON and the set's index.json: shard
checksums and counts, keys, 16 kHz mono, sample counts, durations, audio checksums and that every
transcript character is in vocab.json. Each problem names the shard and the sample.
"""

from __future__ import annotations

import hashlib
import json

from tqdm import tqdm

from ..audio import SAMPLE_RATE, AudioError, decode
from ..text import vocab_chars, vocab_hash
from . import index as fmt
from . import remote
from .shardset import load_vocab_at


def verify(directory: str, progress: bool = True) -> list[str]:
    """Every problem found in the shard set at ``directory`` (a directory or a URL; an empty list means it is
    sound)."""
    d = str(directory)
    index = fmt.read_index(d)
    problems: list[str] = []
    try:
        vocab = load_vocab_at(d)
    except (OSError, ValueError) as e:
        problems.append(f"{remote.join(d, fmt.VOCAB_NAME)}: {e}")
        vocab = None
    if vocab is not None and vocab_hash(vocab) != index["vocab_sha256"]:
        problems.append(f"{remote.join(d, fmt.VOCAB_NAME)}: does not match the vocab_sha256 recorded in index.json")
    allowed = vocab_chars(vocab) if vocab else None
    audio_ext = index["audio_format"]
    keys: dict[str, str] = {}
    total = 0
    table = [fmt.SAMPLES_HEADER]  # samples.tsv as these shards give it; None once a shard cannot
    with tqdm(total=index["num_samples"], unit="utt", desc="verifying", disable=not progress, mininterval=1.0) as bar:
        for shard in index["shards"]:
            path = remote.join(d, shard["name"])
            try:
                data = remote.read_file(d, shard["name"])  # read once: checksummed, then parsed from memory
            except FileNotFoundError:
                problems.append(f"{shard['name']}: missing")
                table = None
                continue
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{shard['name']}: checksum differs from index.json (the file changed or is damaged)")
            count = 0
            try:
                for key, files in fmt.iter_shard(path, data):
                    count += 1
                    bar.update()
                    where = f"{shard['name']} sample {key}"
                    problems.extend(f"{where}: {p}" for p in _check_sample(key, files, audio_ext, allowed))
                    if key in keys:
                        problems.append(f"{where}: key also in {keys[key]}")
                    keys[key] = shard["name"]
            except fmt.ShardError as e:
                problems.append(f"{shard['name']}: {e}")
            try:
                if table is not None:
                    table += fmt.sample_table_lines(shard["name"], fmt.list_shard(path, data), audio_ext)
            except (fmt.ShardError, KeyError, ValueError):
                table = None  # a damaged shard, reported above
            if count != shard["num_samples"]:
                problems.append(f"{shard['name']}: {count} samples read, index.json says {shard['num_samples']}")
            total += count
    if total != index["num_samples"]:
        problems.append(f"{total} samples in all, index.json says {index['num_samples']}")
    problems.extend(_check_sample_table(d, index, None if table is None else "".join(table).encode("utf-8")))
    return problems


def _check_sample_table(d: str, index: dict, expected: bytes | None) -> list[str]:
    """samples.tsv, where index.json records one, is ``expected``: what the shards hold (None: a shard is
    damaged, reported already). Sets built by an older asr-dist have none: their readers list the shards."""
    entry = index.get("samples_table")
    if not entry:
        return []
    try:
        data = remote.read_file(d, fmt.SAMPLES_NAME)
    except (OSError, remote.RemoteError) as e:
        return [f"{fmt.SAMPLES_NAME}: unreadable ({e}); readers list the shards instead"]
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return [f"{fmt.SAMPLES_NAME}: checksum differs from index.json (the file changed or is damaged)"]
    return [] if expected is None or data == expected else [f"{fmt.SAMPLES_NAME}: does not describe the shards as they are"]


def _check_sample(key: str, files: dict[str, bytes], audio_ext: str, allowed: set[str] | None) -> list[str]:
    out = []
    if not fmt.KEY_RE.match(key):
        out.append("key is not WebDataset-safe (dots, slashes or a leading underscore)")
    if set(files) != {audio_ext, "json"}:
        out.append(f"has files {sorted(files)}, expected {audio_ext} and json")
        if audio_ext not in files or "json" not in files:
            return out
    try:
        meta = json.loads(files["json"])
        text, num_samples, duration = meta["text"], meta["num_samples"], meta["duration"]
    except (ValueError, KeyError, TypeError) as e:
        return out + [f"unreadable JSON ({e})"]
    data = files[audio_ext]
    if meta.get("audio_sha256") and hashlib.sha256(data).hexdigest() != meta["audio_sha256"]:
        out.append("audio bytes differ from their recorded checksum")
    try:
        import soundfile as sf
        import io

        info = sf.info(io.BytesIO(data))
        audio, sr = decode(data)
    except AudioError as e:
        return out + [f"audio does not decode: {e.detail}"]
    if sr != SAMPLE_RATE:
        out.append(f"sample rate {sr}, expected {SAMPLE_RATE}")
    if info.channels != 1:
        out.append(f"{info.channels} channels, expected mono")
    if len(audio) != num_samples:
        out.append(f"{len(audio)} samples decoded, JSON says {num_samples}")
    if abs(duration - num_samples / SAMPLE_RATE) > 1e-3:
        out.append(f"duration {duration} does not match {num_samples} samples")
    if not text:
        out.append("empty transcript")
    if allowed is not None:
        oov = sorted(set(text) - allowed)
        if oov:
            out.append(f"transcript characters not in vocab.json: {''.join(oov)!r}")
    return out


INFO_VALUES_SHOWN = 12


def info(directory: str) -> str:
    """Counts, hours, a duration histogram and the character inventory, as text."""
    d = str(directory)
    index = fmt.read_index(d)
    lines = [
        f"{d}: {index['num_samples']} utterances, {index['audio_hours']:.3f} h in {index['num_shards']} shards "
        f"of {index['shard_size']}" + (" (the last is short)" if index["last_shard_short"] else ""),
        f"audio: {index['sample_rate']} Hz mono {index['audio_format']}; text normaliser: "
        f"{index['text_normalizer']['name']} {json.dumps(index['text_normalizer']['settings'])}",
        f"rejected at build: {index['num_rejected']} (see {fmt.REJECTS_NAME})",
        *([f"BUILD FAILED: {fmt.build_failure(index).split(': ', 1)[1]}; training refuses this set unless "
           f"data.allow_failed_shards=true (or rebuild with a higher --max-reject-fraction)"]
          if fmt.build_failure(index) else []),
        "",
        "duration histogram (seconds):",
    ]
    counts = index["duration_histogram"]["counts"]
    width = index["duration_histogram"]["bin_seconds"]
    peak = max(counts.values(), default=1)
    for lo, n in counts.items():
        a = int(lo) * width
        lines.append(f"  {a:5.0f}-{a + width:<4.0f} {n:8d} {'#' * max(1, round(40 * n / peak))}")
    lines += ["", "characters (count):"]
    chars = index["characters"]
    lines.append("  " + "  ".join(f"{c if c != ' ' else '␣'}:{n}" for c, n in sorted(chars.items(), key=lambda kv: -kv[1])))
    fields = index.get("fields") or {}
    if fields:
        lines += ["", "metadata fields (samples with a value; the most frequent values):"]
    for name, f in fields.items():
        shown = list(f["counts"].items())[:INFO_VALUES_SHOWN]
        more = f" … {f['num_values'] - len(shown)} more" if f["num_values"] > len(shown) else ""
        lines.append(f"  {name}: {f['num_samples']} samples, {f['num_values']} values: "
                     + ", ".join(f"{v}:{n}" for v, n in shown) + more)
    return "\n".join(lines)
