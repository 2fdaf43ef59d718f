"""ONNX export of a trained CTC model, and transcription through onnxruntime on CPUs.

  exported model directory ({output_dir}/model, best, or an averaged one)
  ──torch.onnx.export (dynamic batch and length; the attention mask where the feature extractor makes one)──>
      model.onnx, checked against the PyTorch model on a padded batch of two lengths before it is kept
  ──onnxruntime.quantization.quantize_dynamic (--int8: int8 weights of the matrix products)──> model.int8.onnx
  + the processor, vocab, model card, asr_dist.json and language_model/ beside it: `asr-dist transcribe --onnx`
    reads the directory as it reads a model directory

sherpa-onnx and other CPU servers run such exports of the wav2vec2 layout. Every family exports: wav2vec2
(XLS-R, MMS), HuBERT, data2vec-audio, WavLM (its gated relative-position bias), wav2vec2-conformer (relative
and rotary positions) and w2v-BERT 2.0 (its fbank features in, a mask per feature frame); each export is
checked on a batch of other lengths than the one traced, so a length frozen into the graph is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

# the families whose exports were checked (tests/test_onnx.py); a new family is refused until it is
ONNX_FAMILIES = ("wav2vec2", "hubert", "data2vec-audio", "wavlm", "wav2vec2-conformer", "wav2vec2-bert")
TOLERANCE = 1e-3  # the largest logit difference an export may show against the PyTorch model (fp32)


class OnnxError(UserError, ValueError):
    """A model that cannot be exported or an ONNX directory that cannot be read; says why."""


def _require() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxError(f"ONNX export and transcription need {' and '.join(missing)}: pip install 'asr-dist[onnx]'")


def _uses_attention_mask(model_dir: Path) -> bool:
    """Whether the model's feature extractor hands it an attention mask (wav2vec2's layer-norm layouts; the
    group-norm base models take none), as transformers' pipeline does."""
    for name in ("preprocessor_config.json", "processor_config.json"):  # transformers 4's file, then 5's
        path = model_dir / name
        if path.exists():
            settings = json.loads(path.read_text())
            settings = settings.get("feature_extractor", settings)
            return bool(settings.get("return_attention_mask", True))
    return True


def export_onnx(model_dir: str | Path, out: str | Path, int8: bool = False, opset: int = 17) -> dict:
    """Export ``model_dir`` to ``out`` (replaced whole): model.onnx (and model.int8.onnx), the processor and
    what else the directory holds besides weights; returns what onnx.json records."""
    from .export import whole_dir
    from .models import ModelError, load_for_inference

    _require()
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise OnnxError(f"{model_dir}: no config.json; give a model directory exported by training ({{output_dir}}/model, "
                        f"best, or one `asr-dist average` wrote)")
    try:
        model, family = load_for_inference(model_dir, torch.device("cpu"))
    except ModelError as e:
        raise OnnxError(str(e)) from None
    if family.name not in ONNX_FAMILIES:
        raise OnnxError(f"{model_dir}: a {family.name} model; ONNX export covers {', '.join(ONNX_FAMILIES)} "
                        f"(its export is not verified); serve it with PyTorch")
    model = model.float().eval()
    masked = _uses_attention_mask(model_dir)
    featurize = family.featurizer()
    names = [family.input_name] + (["attention_mask"] if masked else [])
    # traced on a padded batch of two lengths; checked on it and on a batch of three other lengths, so that
    # a length the trace froze into the graph (a position table, a mask's size) shows as a difference
    args = _batch(featurize, (24000, 14000), masked)
    other = _batch(featurize, (37000, 9000, 20500), masked, seed=1)
    axes = {name: {0: "batch", 1: "length"} for name in names}  # the input's time axis: samples, or fbank frames
    axes["logits"] = {0: "batch", 1: "frames"}

    with whole_dir(out, ".onnx-") as tmp:
        with torch.no_grad():
            # the model itself, called with (inputs, attention_mask) in its forward's order (a wrapper module that
            # renamed them traced a graph whose attention ignored the mask); TorchScript's exporter: torch.export's
            # needed about ten times as long here for the same graph
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
                torch.onnx.export(model, args, str(tmp / "model.onnx"), input_names=names, output_names=["logits"],
                                  dynamic_axes=axes, opset_version=opset, dynamo=False)
            expected = model(*args).logits.numpy()
            expected_other = model(*other).logits.numpy()
        for f in model_dir.iterdir():  # the processor, vocab, card, LM: everything but the PyTorch weights
            if f.suffix not in (".safetensors", ".bin") and f.name != "onnx.json":
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        files = {"model.onnx": _check(tmp / "model.onnx", names, [(args, expected), (other, expected_other)],
                                      TOLERANCE)}
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            root = logging.getLogger()
            level, root.level = root.level, max(root.level, logging.WARNING)  # its notes go to the root logger
            try:
                quantize_dynamic(str(tmp / "model.onnx"), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
            files["model.int8.onnx"] = _check(tmp / "model.int8.onnx", names,
                                              [(args, expected), (other, expected_other)], None)
        record = {"family": family.name, "opset": opset, "inputs": names, "files": files,
                  "frames_per_sample": 1 / model.config.inputs_to_logits_ratio}
        (tmp / "onnx.json").write_text(json.dumps(record, indent=1) + "\n")
    log.info("exported %s to %s (%s)", model_dir, out, ", ".join(files))
    return record


def _batch(featurize, lengths: tuple[int, ...], masked: bool, seed: int = 0) -> tuple:
    """A padded batch of random audio of ``lengths`` samples, featurised as the family's model takes it: the
    input and, where the model takes one, its attention mask (per sample, or per feature frame)."""
    from .data.samples import padded_inputs

    rng = np.random.default_rng(seed)
    batch, mask = padded_inputs([featurize(rng.standard_normal(n).astype(np.float32)) for n in lengths])
    return (torch.from_numpy(batch),) + ((torch.from_numpy(mask),) if masked else ())


def _check(path: Path, names: list[str], cases: list[tuple[tuple, np.ndarray]], tolerance: float | None) -> dict:
    """The ONNX model's largest logit difference and greedy agreement with PyTorch's over the check batches
    ``cases`` ((inputs, PyTorch's logits)); beyond ``tolerance`` the export is refused."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff, same, frames = 0.0, 0, 0
    for args, expected in cases:
        try:
            got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors: a shape the trace froze
            raise OnnxError(f"{path.name}: onnxruntime cannot run it on a batch of another length ({str(e)[:300]}); "
                            f"the export is not kept") from None
        if got.shape != expected.shape:
            raise OnnxError(f"{path.name}: logits of shape {got.shape}, the PyTorch model's {expected.shape}; the "
                            f"export is not kept")
        diff = max(diff, float(np.abs(got - expected).max()))
        same += int((got.argmax(-1) == expected.argmax(-1)).sum())
        frames += expected.shape[0] * expected.shape[1]
    agree = same / frames
    if tolerance is not None and not diff <= tolerance:
        raise OnnxError(f"{path.name}: its logits differ from the PyTorch model's by up to {diff:.3g} (more than "
                        f"{tolerance:g}); the export is not kept")
    return {"max_logit_difference": round(diff, 7), "greedy_frame_agreement": round(agree, 4)}


class OnnxCTC:
    """An exported ONNX directory as a CTC model that asr_dist.decode.chunked_logits can call:
    ``model(input_values=…, attention_mask=…).logits`` and ``model.config`` (the transformers config)."""

    def __init__(self, directory: str | Path, int8: bool = False, threads: int | None = None):
        _require()
        import onnxruntime as ort
        import transformers

        d = Path(directory)
        name = "model.int8.onnx" if int8 else "model.onnx"
        if not (d / name).exists():
            hint = " (export with --int8)" if int8 and (d / "model.onnx").exists() else ""
            raise OnnxError(f"{d}: no {name}{hint}; make one with `asr-dist export-onnx --model MODEL_DIR --output {d}`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(d / name), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
        self.directory = d

    def __call__(self, attention_mask=None, **inputs):
        (x,) = inputs.values()
        feed = {self.inputs[0]: x.cpu().numpy().astype(np.float32)}
        if "attention_mask" in self.inputs:
            mask = attention_mask if attention_mask is not None else torch.ones(x.shape[:2], dtype=torch.int64)
            feed["attention_mask"] = mask.cpu().numpy().astype(np.int64)
        return types.SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))
