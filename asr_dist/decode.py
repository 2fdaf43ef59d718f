"""Using a trained model: `asr-dist evaluate` (exact WER/CER on a shard set or any corpus the shard
builder reads) and `asr-dist transcribe` (any audio, long recordings in overlapping chunks).

A model directory is what training exports: a transformers CTC model of one of asr_dist.models'
families (named by its config.json) + its processor, and asr_dist.json naming the text normaliser of
its training data, which evaluation applies to the references of a corpus given in another layout.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .data import index as fmt
from .data.eval_loader import EvalLoader
from .data.samples import padded_inputs
from .data.shardset import ShardSet
from .config import DistributedArgs
from .distributed import DistEnv, device_index, end_group, get_env, init_torch_process_group
from .errors import InvalidValue, UserError
from .evaluation import evaluate_set
from .metrics import GreedyDecoder
from .text import load_vocab

log = logging.getLogger(__name__)


class ModelDirError(UserError, ValueError):
    """Not a model directory or training checkpoint that asr-dist can load; says what it lacks."""


@contextlib.contextmanager
def model_directory(path: str):
    """An exported model directory as it is; a training checkpoint converted into a temporary one."""
    from .export import checkpoint_to_model_dir, is_checkpoint

    if not is_checkpoint(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="asr-dist-ckpt-") as tmp:
        log.info("reading the training checkpoint %s", path)
        yield str(checkpoint_to_model_dir(path, Path(tmp) / "model"))


def load_model_dir(model_dir: str, device: torch.device):
    """``(model, vocab, meta, family)`` of an exported model directory."""
    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise ModelDirError(f"{d}: no config.json; give a model directory exported by training ({{output_dir}}/model "
                            f"or {{output_dir}}/best)")
    from .models import ModelError, load_for_inference, set_attention_kernels

    set_attention_kernels(False)  # evaluation batches change length at every step (see the function)
    try:
        model, family = load_for_inference(d, device)
    except ModelError as e:
        raise ModelDirError(str(e)) from None
    vocab = load_vocab(d / "vocab.json")
    meta = json.loads((d / "asr_dist.json").read_text()) if (d / "asr_dist.json").exists() else {}
    return model, vocab, meta, family


def _as_shards(source: str, vocab_path: Path, meta: dict, tmp: Path, subset: str | None = None,
               split: str | None = None) -> str:
    """A shard set as is; any other corpus (its ``subset`` and ``split`` where it has them) is built into a
    temporary one with the model's normaliser."""
    from .data.remote import is_url, local_path

    if is_url(source) or (Path(local_path(source)) / fmt.INDEX_NAME).exists():
        if subset or split:
            raise ModelDirError(f"{source} is a shard set, which has no subsets or splits; leave out "
                                f"--subset and --split, or give the corpus itself")
        return source
    from .data.writer import BuildOptions, build

    norm = meta.get("text_normalizer", {"name": "danish", "settings": {}})
    log.info("building evaluation shards from %s with the %s normaliser", source, norm["name"])
    out = tmp / "shards"
    s = build(BuildOptions(inputs=[source], output=str(out), normalizer=norm["name"],
                           normalizer_settings=norm.get("settings", {}), vocab=str(vocab_path), progress=False,
                           max_reject_fraction=1.0, max_duration=3600, subset=subset, split=split))
    if s.num_rejected:
        log.warning("%d utterances of %s could not be evaluated; see %s", s.num_rejected, source, out / fmt.REJECTS_NAME)
    return str(out)


def evaluate_model(model_dir: str, source: str, report: str | None = None, predictions: str | None = None,
                   micro_batch_size: int = 16, num_workers: int = 2, denv: DistEnv | None = None,
                   progress: bool = True, decoder: dict | None = None, micro_batch_seconds: float | None = None,
                   group_by: list[str] | None = None, seed: int = 0, subset: str | None = None,
                   split: str | None = None, cache_dir: str | None = None) -> dict:
    """WER, CER and error counts of ``model_dir`` (an exported model or a training checkpoint) on
    ``source``, on every rank of the job. ``decoder``: None for greedy decoding, else
    BeamSearchDecoder's arguments (lm, beam_width, alpha, beta). ``group_by``: metadata fields of the
    samples' JSON to break the rates down by (``result["groups"]``, bootstrap intervals from ``seed``).
    ``subset``, ``split``: which part of a Hugging Face dataset or Common Voice release ``source`` is.
    ``cache_dir``: a node-local directory for the shards of a set at a URL (asr_dist.data.remote)."""
    denv = denv or get_env()
    started = denv.world_size > 1 and not (dist.is_available() and dist.is_initialized())
    try:
        with model_directory(model_dir) as d:
            result = _evaluate_model(d, source, report, predictions, micro_batch_size, micro_batch_seconds,
                                     num_workers, denv, progress, decoder, group_by or [], seed, subset, split,
                                     cache_dir)
    finally:
        if started:  # the group this evaluation started ends with it, on error too
            end_group()
    result["model"] = str(model_dir)
    if report and result.pop("_write_report", False):
        Path(report).write_text(json.dumps(result, indent=1) + "\n")
    result.pop("_write_report", None)
    return result


def _evaluate_model(model_dir, source, report, predictions, micro_batch_size, micro_batch_seconds, num_workers, denv,
                    progress, decoder, group_by=(), seed=0, subset=None, split=None, cache_dir=None) -> dict:
    beam = _beam_decoder(model_dir, decoder)
    device = (torch.device(f"cuda:{device_index(denv, torch.cuda.device_count())}") if torch.cuda.is_available()
              else torch.device("cpu"))
    if denv.world_size > 1:
        init_torch_process_group(denv, DistributedArgs.timeout_minutes, cuda=device.type == "cuda")
    model, vocab, meta, family = load_model_dir(model_dir, device)
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir, failed = None, None
        if denv.is_main:
            try:
                shards_dir = _as_shards(source, Path(model_dir) / "vocab.json", meta, Path(tmp), subset, split)
            except UserError as e:  # every rank stops with it, none waits for a set that never comes
                failed = e
        if denv.world_size > 1:
            box = [shards_dir, None if failed is None else str(failed)]
            dist.broadcast_object_list(box, src=0)  # ranks share the temporary set (one machine) or a shard set
            shards_dir = box[0]
            if box[1] is not None and failed is None:
                failed = UserError(box[1])
        if failed is not None:
            raise failed
        shards = ShardSet.open(shards_dir, cache_dir=cache_dir).for_evaluation()
        if shards.vocab != vocab:
            raise ModelDirError(f"{shards_dir}: its vocab.json differs from the model's; build it with "
                                f"--vocab {Path(model_dir) / 'vocab.json'} (or give the corpus itself)")
        loader = EvalLoader(shards, rank=denv.rank, world_size=denv.world_size, micro_batch_size=micro_batch_size,
                            micro_batch_seconds=micro_batch_seconds, num_workers=num_workers,
                            featurize=family.featurizer())
        t0 = time.time()
        with tqdm(total=len(loader), unit="batch", desc="evaluating", disable=not (progress and denv.is_main)) as bar:
            r = evaluate_set(lambda x, m: model(**{family.input_name: x}, attention_mask=m).logits,
                             lambda n: family.output_frames(model.config, n), loader, beam or GreedyDecoder(vocab),
                             model.config.pad_token_id, device, torch.float32, denv.world_size,
                             keep_predictions=predictions is not None or bool(group_by), progress=bar)
        elapsed = time.time() - t0
        rows = r["predictions"]
        if denv.world_size > 1 and (predictions is not None or group_by):
            gathered = [None] * denv.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        groups = _groups(shards, sorted(rows), group_by, seed) if group_by else None
    c = r["counts"]
    result = {
        "model": str(model_dir), "data": str(source), "wer": c.wer, "cer": c.cer, "loss": r["loss"],
        "num_utterances": c.utterances, "num_words": c.ref_words, "num_chars": c.ref_chars,
        "substitutions": c.substitutions, "deletions": c.deletions, "insertions": c.insertions,
        "word_edits": c.word_edits, "char_edits": c.char_edits, "audio_hours": r["audio_seconds"] / 3600,
        "real_time_factor": elapsed / r["audio_seconds"] if r["audio_seconds"] else None,
        "world_size": denv.world_size, "text_normalizer": meta.get("text_normalizer"),
        "decoder": beam.settings() if beam else {"decoder": "greedy"},
    }
    if groups is not None:
        result["groups"] = groups
    if denv.is_main:
        result["_write_report"] = bool(report)
        if predictions is not None:
            with open(predictions, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f, delimiter="\t", lineterminator="\n")
                w.writerow(["key", "reference", "hypothesis", "word_errors"])
                w.writerows(sorted(rows))
    return result


def _groups(shards: ShardSet, rows: list, fields: list[str], seed: int) -> dict:
    """{field: {value: rates, counts, intervals}} from every rank's (key, ref, hyp, …) rows, the same on
    every rank (all ranks hold all rows, in key order)."""
    from .data import index as fmt
    from .metrics import group_report, utterance_counts

    from .data.shardset import list_samples

    shards_dir = shards.dirs[0]
    index = fmt.read_index(shards_dir)
    known = index.get("fields") or {}
    missing = [f for f in fields if f not in known]
    if missing:
        raise ModelDirError(f"{shards_dir}: no metadata field {', '.join(missing)} in its samples; fields there: "
                            f"{', '.join(known) or '(none; build the shards with --keep-fields)'}")
    meta = {}
    for shard in shards.shards:
        for loc in list_samples(shard):
            m = json.loads(loc.meta)
            meta[loc.key] = {f: m.get(f) for f in fields}
    counts = [utterance_counts(ref, hyp or "") for _, ref, hyp, *_ in rows]
    return {f: group_report([meta[row[0]][f] for row in rows], counts, seed=seed) for f in fields}


def _beam_decoder(model_dir: str, options: dict | None):
    """None (greedy) or a BeamSearchDecoder: from ``options``, else from an LM the model directory
    carries (asr-dist lm build --attach); options {"greedy": True} forces greedy decoding."""
    from .lm import BeamSearchDecoder, attached

    if options and options.get("greedy"):
        return None
    if not options or (options.get("lm") is None and attached(model_dir)):
        carried = attached(model_dir)
        if carried is None:
            return None
        options = {**carried, **{k: v for k, v in (options or {}).items() if k == "beam_width"}}
        log.info("decoding with the language model %s carried by the model (alpha %g, beta %g)", carried["lm"],
                 carried["alpha"], carried["beta"])

    vocab = json.loads((Path(model_dir) / "vocab.json").read_text(encoding="utf-8"))
    return BeamSearchDecoder(vocab, options.get("lm"), beam_width=options.get("beam_width", 32),
                             alpha=options.get("alpha", 0.5), beta=options.get("beta", 1.0))


def chunked_logits(model, x: np.ndarray, chunk: int, stride: int, batch_size: int, device) -> torch.Tensor:
    """CTC logits (F, V) of a long recording, chunked as transformers' ASR pipeline does (so greedy
    decoding of these equals its output): windows of ``chunk`` samples, ``stride`` samples of context on
    each inner side whose frames are dropped, the rest joined."""
    step = chunk - 2 * stride
    windows = []  # (start, end, left context, right context) in samples
    for start in range(0, len(x), step):
        end = start + chunk
        last = end >= len(x)
        windows.append((start, min(end, len(x)), 0 if start == 0 else stride, 0 if last else stride))
        if last:
            break
    ratio = 1 / model.config.inputs_to_logits_ratio  # what the pipeline uses to cut the frames of a window
    from .models import family_for

    family = family_for(model.config)
    featurize = family.featurizer()
    pieces = []
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        batch, mask = padded_inputs([featurize(x[a:b]) for a, b, _, _ in group])
        with torch.no_grad():
            logits = model(**{family.input_name: torch.from_numpy(batch).to(device)},
                           attention_mask=torch.from_numpy(mask).to(device)).logits.float().cpu()
        for j, (a, b, left, right) in enumerate(group):
            n = int(round((b - a) * ratio))
            pieces.append(logits[j, int(round(left * ratio)):n - int(round(right * ratio))])
    return torch.cat(pieces)


def transcribe(model_dir: str, audio: list[str], chunk_length_s: float = 20.0, stride_length_s: float = 4.0,
               batch_size: int = 8, decoder: dict | None = None, onnx: str | None = None) -> list[dict]:
    """Transcripts of audio files of any format and rate; long ones in overlapping chunks (strided CTC).
    Greedy through transformers' pipeline, or the beam search (with an n-gram LM) on the same chunking.
    ``model_dir``: an exported model or a training checkpoint; with ``onnx`` ("fp32" or "int8") a directory of
    `asr-dist export-onnx`, run through onnxruntime on the same chunking."""
    if onnx is not None:
        return _transcribe(model_dir, audio, chunk_length_s, stride_length_s, batch_size, decoder, onnx)
    with model_directory(model_dir) as d:
        return _transcribe(d, audio, chunk_length_s, stride_length_s, batch_size, decoder)


def _transcribe(model_dir, audio, chunk_length_s, stride_length_s, batch_size, decoder, onnx=None) -> list[dict]:
    import transformers

    from .audio import AudioError, decode, to_16k

    beam = _beam_decoder(model_dir, decoder)
    greedy = None
    if onnx is not None:
        from .metrics import GreedyDecoder
        from .onnx_export import OnnxCTC

        model, device = OnnxCTC(model_dir, int8=onnx == "int8"), torch.device("cpu")
        greedy = None if beam is not None else GreedyDecoder(load_vocab(Path(model_dir) / "vocab.json"))
        chunk, stride = int(chunk_length_s * 16000), int(stride_length_s * 16000)
        if chunk <= 2 * stride:
            raise InvalidValue(f"--chunk-length {chunk_length_s} must be more than twice --stride {stride_length_s}")
    elif beam is not None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _, _, _ = load_model_dir(model_dir, device)
        chunk, stride = int(chunk_length_s * 16000), int(stride_length_s * 16000)
        if chunk <= 2 * stride:
            raise InvalidValue(f"--chunk-length {chunk_length_s} must be more than twice --stride {stride_length_s}")
    else:
        device = 0 if torch.cuda.is_available() else "cpu"
        asr = transformers.pipeline("automatic-speech-recognition", model=model_dir, device=device)
    out = []
    for path in audio:
        try:
            samples, sr = decode(path)
        except AudioError as e:
            out.append({"audio": path, "error": f"{e.reason}: {e.detail}"})
            continue
        x = to_16k(samples, sr)
        if greedy is not None:
            logits = chunked_logits(model, x, chunk, stride, batch_size, device)
            text = greedy(logits[None], torch.tensor([len(logits)]))[0]
        elif beam is not None:
            logits = chunked_logits(model, x, chunk, stride, batch_size, device)
            text = beam.decode(torch.log_softmax(logits, dim=-1).numpy())
        else:
            text = asr({"raw": x, "sampling_rate": 16000}, chunk_length_s=chunk_length_s,
                       stride_length_s=stride_length_s, batch_size=batch_size)["text"]
        out.append({"audio": path, "text": text, "duration": round(len(x) / 16000, 3)})
    return out
