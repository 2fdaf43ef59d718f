"""From a shard's sample to a micro-batch, padded or packed: decoding, featurising, label encoding, collation.

  sample: audio bytes (.flac | .wav) + JSON {num_samples, text, …}
  ──skip what the model cannot align (more CTC labels than its frames; ``alignable``, from the JSON) and what
    does not decode, counted as skipped samples──> (BatchMaker)
  ──decode FLAC/WAV (16 kHz mono), augment (training, ``augment``: asr_dist.data.augment), featurise (the model family's: normalise, or fbank frames),
    encode labels (LabelEncoder)──> (key, model input, label ids, text)
  ──collate: pad the time axis, labels with -100──> micro-batch
    (or collate_packed, data.pack: the utterances end to end at a capacity; asr_dist.data.packing)

Batch keys: ``input_values`` (B, T) float32 (the model's input, whatever the family's keyword: the
waveform, or (B, F, D) feature frames), ``attention_mask`` (B, T) (or (B, F)) bool, ``labels`` (B, L)
int64 padded with -100, ``keys`` list[str], ``texts`` list[str], ``durations`` (B,) float32. A packed
micro-batch has ``input_values`` (1, S) and, in place of the mask, ``starts`` and ``lengths`` (B,) int64.
B: utterances, T: samples of 16 kHz audio, F: feature frames of D values, L: CTC labels.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import soundfile as sf
import torch

from ..audio import SAMPLE_RATE, AudioError, decode
from ..text import PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER
from . import index as fmt
from .packing import collate_packed
from .shardset import LoaderError

log = logging.getLogger(__name__)


class LabelEncoder:
    """Transcript characters to CTC label ids (space -> "|", unknown -> [UNK]), as
    Wav2Vec2CTCTokenizer encodes them for this vocab."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.unk = vocab[UNK_TOKEN]
        self.pad = vocab[PAD_TOKEN]
        self.table = {c: i for c, i in vocab.items() if len(c) == 1}
        self.table[" "] = vocab[WORD_DELIMITER]

    def __call__(self, text: str) -> list[int]:
        return [self.table.get(c, self.unk) for c in text]


def sample_meta(raw: bytes | str) -> dict:
    """A sample's JSON as a dict with its num_samples; ValueError (the caller names the sample) otherwise."""
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError(f"its JSON is a {type(meta).__name__}, not an object")
    if not isinstance(meta.get("num_samples"), int) or not isinstance(meta.get("text"), str):
        raise ValueError("its JSON lacks a whole-number num_samples or a text string")
    return meta


def decode_audio(data: bytes, where: str) -> np.ndarray:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels = f.samplerate, f.channels
        audio, _ = decode(data)  # in blocks: a damaged header's frame count allocates nothing
    except (AudioError, sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise fmt.ShardError(f"{where}: audio does not decode ({e})") from None
    if sr != SAMPLE_RATE or channels != 1:
        raise fmt.ShardError(f"{where}: {sr} Hz, {channels}-channel audio; shards hold 16 kHz mono")
    return audio


def collate(samples: list[tuple[str, np.ndarray, list[int], str]], pad_to_multiple_of: int = 1,
            seconds: list[float] | None = None) -> dict:
    """(key, model input, label ids, text) per utterance -> a padded micro-batch. The model input is the
    featuriser's: normalised audio (T,) (``input_values`` (B, T)) or feature frames (F, D) (``input_values``
    (B, F, D)); ``attention_mask`` covers its time axis, which is padded to a multiple of
    ``pad_to_multiple_of`` of its own units. ``seconds``: each utterance's audio duration (default: T / 16 kHz,
    for 1-D input)."""
    n = len(samples)
    t_max = max(len(a) for _, a, _, _ in samples)
    t_max = -(-t_max // pad_to_multiple_of) * pad_to_multiple_of
    l_max = max(1, max(len(lab) for _, _, lab, _ in samples))
    input_values = torch.zeros(n, t_max, *samples[0][1].shape[1:], dtype=torch.float32)
    attention_mask = torch.zeros(n, t_max, dtype=torch.bool)  # 1 byte per sample crossing from the workers
    labels = torch.full((n, l_max), -100, dtype=torch.long)
    for i, (_, audio, lab, _) in enumerate(samples):
        input_values[i, : len(audio)] = torch.from_numpy(audio)
        attention_mask[i, : len(audio)] = True
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    if seconds is None:
        if input_values.dim() != 2:
            raise ValueError("collate of feature frames needs each utterance's seconds")
        seconds = [len(a) / SAMPLE_RATE for _, a, _, _ in samples]
    return {
        "input_values": input_values,
        "attention_mask": attention_mask,
        "labels": labels,
        "keys": [k for k, _, _, _ in samples],
        "texts": [t for _, _, _, t in samples],
        "durations": torch.tensor(seconds, dtype=torch.float32),
    }


def input_padding(featurize, pad_to_multiple_of: int) -> int:
    """data.pad_to_multiple_of (samples) in the featuriser's output units: frames where it makes frames
    (it says how many samples a frame spans in ``samples_per_frame``)."""
    return max(1, pad_to_multiple_of // getattr(featurize, "samples_per_frame", 1))


class BatchMaker:
    """A training stream's micro-batch in the making, and its count of skipped samples.

    ``add`` takes one read sample: decoded, featurised and its labels encoded (or only its key and length
    when ``decode`` is False: planning, benchmarks), or skipped: one the model cannot align, one whose audio
    does not decode. ``bad`` reports a damaged sample: it stops the run (data.on_corrupt=stop) or is counted
    in ``skipped``. ``take`` hands over the micro-batch formed so far and starts the next."""

    def __init__(self, vocab: dict[str, int], *, on_corrupt: str, pad_to_multiple_of: int, decode: bool, featurize,
                 alignable, num_samples: int, skipped: int = 0, packing: tuple | None = None, augment=None):
        self.augment = augment  # EpochAugment (asr_dist.data.augment): the epoch's augmentation; None: the audio as read
        self.packing = packing  # (align, capacities): micro-batches packed (asr_dist.data.packing); None: padded
        self.encode = LabelEncoder(vocab)
        self.on_corrupt, self.decode, self.featurize, self.alignable = on_corrupt, decode, featurize, alignable
        self.padding = input_padding(featurize, pad_to_multiple_of)
        self.num_samples = num_samples  # of the shards read: refusals in a row beyond it are a whole pass refused
        self.skipped = skipped  # damaged or unalignable samples skipped so far this epoch
        self.refused_in_row = 0  # utterances the model cannot align since the last micro-batch taken
        self._new()

    def _new(self) -> None:
        self.samples: list = []
        self.shards: list[int] = []  # each utterance's shard (index into the stream's shards)
        self.seconds: list[float] = []

    def add(self, path: str, shard: int, key: str, data: bytes, meta: dict) -> None:
        """Append one read sample of shard number ``shard`` (at ``path``) to the micro-batch, or skip it."""
        if self.alignable is not None and not self._fits(path, key, meta):
            return
        if not self.decode:
            self.add_length(shard, key, meta["num_samples"])
            return
        try:
            audio = decode_audio(data, key)
        except fmt.ShardError as e:
            self.bad(path, key, str(e))
            return
        if self.augment is not None:
            audio = self.augment(audio, key)
        self.samples.append((key, self.featurize(audio), self.encode(meta["text"]), meta["text"]))
        self.shards.append(shard)
        self.seconds.append(len(audio) / SAMPLE_RATE)

    def length(self, key: str, num_samples: int) -> int:
        """The samples an utterance of ``num_samples`` as read will have when delivered (speed perturbation)."""
        return num_samples if self.augment is None else self.augment.length(key, num_samples)

    def add_length(self, shard: int, key: str, num_samples: int) -> None:
        """Append a sample as its key and delivered length only (``decode`` False)."""
        self.samples.append((key, self.length(key, num_samples)))
        self.shards.append(shard)

    def take(self) -> dict:
        """The micro-batch formed (at least one sample): collated, or ``keys`` and ``num_samples`` when not
        decoding, with ``shards``."""
        if self.decode and self.packing is not None:
            batch = collate_packed(self.samples, *self.packing, self.seconds)
        elif self.decode:
            batch = collate(self.samples, self.padding, self.seconds)
        else:
            batch = {"keys": [k for k, _ in self.samples], "num_samples": [n for _, n in self.samples]}
        batch["shards"] = self.shards
        self.refused_in_row = 0
        self._new()
        return batch

    def _fits(self, path: str, key: str, meta: dict) -> bool:
        """Whether the model can align the sample; one it cannot is skipped like a damaged one (counted, logged),
        whatever data.on_corrupt says: its CTC loss would be infinite, zeroed by ctc_zero_infinity, and train nothing."""
        try:
            labels = self.encode(meta["text"])
            frames, need = self.alignable(self.length(key, meta["num_samples"]), labels)
        except (KeyError, TypeError):
            return True  # no num_samples or text: the decode path reports the sample
        if frames >= need:
            return True
        self.refused_in_row += 1
        if self.refused_in_row > self.num_samples:  # a whole pass, nothing delivered
            raise LoaderError(f"the model cannot align any utterance of the shards (e.g. {path} sample {key}: "
                              f"{need} CTC frames needed, {frames} made): more labels than frames; the shard set does "
                              f"not fit this model's frame rate (`asr-dist train --dry-run` counts them)")
        self.skipped += 1
        log.warning("skipping %s sample %s: %d CTC labels need %d frames, the model makes %d of its %.2f s; "
                    "the model cannot align it (shards built for another model's frame rate?)", path, key,
                    len(labels), need, frames, self.length(key, meta["num_samples"]) / SAMPLE_RATE)
        return False

    def bad(self, path: str, key: str, why: str) -> None:
        """A damaged sample: stop (data.on_corrupt=stop), or skip it and count it."""
        if self.on_corrupt == "stop":
            raise fmt.ShardError(f"{path} sample {key}: {why} (data.on_corrupt=skip skips such samples)")
        self.skipped += 1
        log.warning("skipping %s sample %s: %s", path, key, why)


def padded_inputs(inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Featurised inputs ((T,) samples, or (F, D) feature frames) as one zero-padded batch and its mask (B, T)."""
    width = max(len(f) for f in inputs)
    batch = np.zeros((len(inputs), width, *inputs[0].shape[1:]), np.float32)
    mask = np.zeros((len(inputs), width), np.int64)
    for j, f in enumerate(inputs):
        batch[j, :len(f)] = f
        mask[j, :len(f)] = 1
    return batch, mask
