#!/usr/bin/env python3
"""CPU transcription of a trained model: PyTorch against onnxruntime fp32 and int8, in one run.

Each engine transcribes the same recordings greedily on the same chunking (asr_dist.decode.chunked_logits):
real-time factor (seconds of compute per second of audio, one thread and all threads) and CER/WER against
the references, so the int8 model's cost in accuracy stands beside its speed.

  python bench/onnx_cpu.py --model demo-output/run/model --corpus demo-output/corpus/eval/eval.tsv
      (a model directory, and a Common Voice TSV whose `path` column names clips/ beside it)
                                                       -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asr_dist.audio import decode, to_16k  # noqa: E402
from asr_dist.decode import chunked_logits, load_model_dir  # noqa: E402
from asr_dist.metrics import GreedyDecoder, pooled_counts, utterance_counts  # noqa: E402
from asr_dist.onnx_export import OnnxCTC, export_onnx  # noqa: E402
from asr_dist.text import Normalizer, load_vocab  # noqa: E402


def run(model, clips: list, refs: list[str], decoder: GreedyDecoder) -> dict:
    seconds = sum(len(x) for x in clips) / 16000
    t0 = time.perf_counter()
    hyps = []
    for x in clips:
        logits = chunked_logits(model, x, 20 * 16000, 4 * 16000, 8, torch.device("cpu"))
        hyps.append(decoder(logits[None], torch.tensor([len(logits)]))[0])
    wall = time.perf_counter() - t0
    counts = pooled_counts([utterance_counts(r, h) for r, h in zip(refs, hyps)])
    return {"real_time_factor": round(wall / seconds, 4), "wer": round(counts.wer, 4), "cer": round(counts.cer, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--limit", type=int, default=150)
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.corpus, encoding="utf-8"), delimiter="\t"))[:args.limit]
    clips = [to_16k(*decode(str(Path(args.corpus).parent / "clips" / r["path"]))) for r in rows]
    meta = json.loads((Path(args.model) / "asr_dist.json").read_text())
    norm = meta.get("text_normalizer", {"name": "danish", "settings": {}})
    normalize = Normalizer(norm["name"], **norm.get("settings", {}))
    refs = [normalize(r["sentence"]) for r in rows]
    decoder = GreedyDecoder(load_vocab(Path(args.model) / "vocab.json"))
    out = {"benchmark": "onnx_cpu", "utterances": len(rows), "audio_seconds": round(sum(map(len, clips)) / 16000, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(args.model, Path(tmp) / "onnx", int8=True)
        out["export_seconds"] = round(time.perf_counter() - t0, 1)
        model, _, _, _ = load_model_dir(args.model, torch.device("cpu"))
        for threads in (1, torch.get_num_threads()):
            torch.set_num_threads(threads)
            engines = {"pytorch_fp32": model, "onnxruntime_fp32": OnnxCTC(Path(tmp) / "onnx", threads=threads),
                       "onnxruntime_int8": OnnxCTC(Path(tmp) / "onnx", int8=True, threads=threads)}
            with torch.no_grad():
                out[f"threads_{threads}"] = {name: run(m, clips, refs, decoder) for name, m in engines.items()}
        base = out[f"threads_{torch.get_num_threads()}"]
        out["int8_cer_delta"] = round(base["onnxruntime_int8"]["cer"] - base["pytorch_fp32"]["cer"], 4)
        out["onnx_fp32_speedup"] = round(base["pytorch_fp32"]["real_time_factor"]
                                         / base["onnxruntime_fp32"]["real_time_factor"], 2)
        out["onnx_int8_speedup"] = round(base["pytorch_fp32"]["real_time_factor"]
                                         / base["onnxruntime_int8"]["real_time_factor"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
