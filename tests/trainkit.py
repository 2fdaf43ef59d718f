"""Helpers for tests that train for real: launch the engine under a launcher, read what it wrote.
The synthesised shard set they train on is the `train_shards` fixture in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from asr_dist.data.writer import BuildOptions, build
from asr_dist.synth import danish_sentences, write_corpus

REPO = Path(__file__).resolve().parents[1]
TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "perf/audio_seconds_per_second",
        "perf/data_wait_fraction", "perf/tflops_per_gpu", "eval/dev/loss", "eval/dev/wer", "eval/dev/cer"]


def make_train_shards(root: Path) -> Path:
    """96 training and 10 held-out utterances of synthesised Danish in shards of 8: root/s-train, root/s-dev."""
    sentences = danish_sentences()
    train = write_corpus(root / "train", "commonvoice", 96, seed=11, sentences=sentences[:-10])
    dev = write_corpus(root / "dev", "commonvoice", 10, seed=12, sentences=sentences[-10:], prefix="dev")
    build(BuildOptions(inputs=[train], output=str(root / "s-train"), shard_size=8, progress=False))
    build(BuildOptions(inputs=[dev], output=str(root / "s-dev"), shard_size=8, progress=False,
                       vocab=str(root / "s-train" / "vocab.json"), max_reject_fraction=1))
    return root


def make_noise_shards(root: Path, n: int = 96, seed: int = 11) -> Path:
    """root/s-train: ``n`` utterances of speech-like noise (band-limited, amplitude-modulated), each about as long
    as speech of its transcript (a Danish sentence), in shards of 8. Made from numpy's generator alone, so the
    samples are the same in every process and on every machine; eSpeak NG's synthesis (make_train_shards)
    differs a little between processes."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    sentences = danish_sentences()
    corpus = root / "noise"
    (corpus / "audio").mkdir(parents=True)
    lines = []
    for i in range(n):
        text = sentences[i % len(sentences)]
        t = int(min(4.0, 0.6 + 0.06 * len(text)) * 16000)
        x = np.convolve(rng.standard_normal(t), np.ones(8) / 8, mode="same")
        x *= 0.2 * (1 + np.sin(np.arange(t) * 2 * np.pi * 4 / 16000))
        sf.write(corpus / "audio" / f"n{i:03d}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        lines.append(json.dumps({"audio_filepath": f"audio/n{i:03d}.wav", "text": text}, ensure_ascii=False))
    (corpus / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build(BuildOptions(inputs=[str(corpus / "m.jsonl")], output=str(root / "s-train"), shard_size=8, progress=False))
    return root


# loader worker processes in a run whose claim involves them (signals, a killed job, damaged samples read
# in a worker); the others read in the rank itself, which saves each launch about 4 s of start-up
WORKERS = "data.num_workers=1"


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.train_shards=[{shards / 's-train'}]", f"data.eval_shards.dev={shards / 's-dev'}",
            "data.global_batch_size=8", "data.micro_batch_size=2", "data.num_workers=0", "data.bucket_batches=4",
            "train.log_every=1", "optim.warmup_steps=4", *extra]


def env() -> dict:
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in launcher_vars}, "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch(launcher: str, args: list[str], timeout: int = 400, **kw) -> subprocess.CompletedProcess:
    cmd = {
        "python": [sys.executable, str(REPO / "launch" / "train.py")],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(29400 + os.getpid() % 500), str(REPO / "launch" / "train.py")],
        "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                      str(29900 + os.getpid() % 90), str(REPO / "launch" / "train.py")],
    }[launcher]
    return subprocess.run(cmd + ["--config", str(REPO / "configs" / "test.yaml"), *args], env=env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def dev_audio(shards: Path) -> dict:
    """The held-out set's audio (16 kHz float32) by key, read from its tar shards."""
    import io
    import tarfile

    import soundfile as sf

    audio = {}
    for tar in sorted((shards / "s-dev").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".flac"):
                    audio[m.name[: -len(".flac")]] = sf.read(io.BytesIO(t.extractfile(m).read()), dtype="float32")[0]
    return audio


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}




def save_base_model(family_name: str, out: Path, seed: int = 0, **config) -> Path:
    """A random tiny *base* model of a family (no CTC head, as XLS-R and the other pretrained checkpoints
    are published) saved with save_pretrained, with its feature extractor: what model.pretrained reads."""
    import torch
    import transformers

    from asr_dist.models import FAMILIES

    family = FAMILIES[family_name]
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(family.preset_config("tiny", **config)).save_pretrained(str(out))
    family.feature_extractor().save_pretrained(str(out))
    return out


def save_random_model(shards: Path, out: Path) -> Path:
    """A random tiny wav2vec2 CTC model for the vocab of ``shards``, saved as an export would be, whose
    head emits characters (not only blanks) so that every kind of edit occurs in its transcripts."""
    import torch
    import transformers

    from asr_dist.models.presets import PRESETS
    from asr_dist.export import make_processor

    vocab = json.loads((shards / "vocab.json").read_text())
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**PRESETS["tiny"], vocab_size=len(vocab),
                                                                     pad_token_id=0))
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.randn(len(vocab)) * 2)
        model.lm_head.bias[0] = -5
    model.save_pretrained(str(out))
    make_processor(shards / "vocab.json").save_pretrained(str(out))
    (out / "asr_dist.json").write_text(json.dumps({"text_normalizer": {"name": "danish", "settings": {}}}))
    return out


def save_initial_model(args: list[str], out: Path) -> Path:
    """The model that a run with these overrides (of configs/test.yaml) starts from, saved as an export is:
    built from the run's seed (a pretrained encoder keeps its weights), with its family's processor over
    the shards' vocabulary. What a trained model is measured against."""
    from asr_dist.config import load_config
    from asr_dist.export import make_processor
    from asr_dist.models import build_model

    cfg = load_config(str(REPO / "configs" / "test.yaml"), args)
    vocab_path = Path(cfg.data.train_shards[0]) / "vocab.json"
    model, family = build_model(cfg.model, json.loads(vocab_path.read_text()), seed=cfg.seed)
    model.save_pretrained(str(out))
    make_processor(vocab_path, family).save_pretrained(str(out))
    return out


def greedy_transcript(model_dir: Path, audio) -> str:
    """A model directory's own greedy CTC decode of one utterance (16 kHz): its processor's features, the
    model's logits, the most likely id at each frame, decoded by its tokenizer (repeats merged, blanks
    dropped). What transformers' pipeline must transcribe."""
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCTC.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logits = model(**processor(audio=audio, sampling_rate=16000, return_tensors="pt")).logits
    return processor.decode(logits.argmax(-1)[0])
