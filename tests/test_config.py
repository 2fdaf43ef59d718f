"""Config loading, validation and the DeepSpeed JSON it generates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asr_dist.config import ConfigError, load_config, reference_markdown
from asr_dist.deepspeed_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: out\ndata:\n  train_shards: [s]\nmodel:\n  preset: tiny\ntrain:\n  max_steps: 100\n")
    return str(p)


def test_defaults_yaml_overrides(yaml):
    cfg = load_config(yaml, ["optim.lr=3e-4", "data.micro_batch_size=4", "data.eval_shards.dev=/x"])
    assert cfg.optim.lr == 3e-4 and cfg.data.micro_batch_size == 4 and cfg.data.eval_shards == {"dev": "/x"}
    assert cfg.data.global_batch_size == 32 and cfg.train.max_steps == 100 and cfg.distributed.precision == "fp16"


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    (["data.micro_batch_size=abc"],
     "data.micro_batch_size takes a whole number or auto, not 'abc', e.g. data.micro_batch_size=16"),
    (["model.freeze_feature_encoder=maybe"], "model.freeze_feature_encoder takes true or false, not 'maybe'"),
    (["train.profile_steps=5"], "train.profile_steps takes a list: write train.profile_steps=[5]"),
    (["data.eval_shards=/x"], "data.eval_shards takes a map of names to values: write data.eval_shards.NAME=/x"),
    (["distributed.precision=fp8"], "choose one of fp16, bf16, fp32"),
    (["model.pretrained=/nowhere"], "exactly one of model.pretrained"),
    (["model.preset=null", "model.pretrained=/nowhere"], "no config.json there"),
    (["train.num_epochs=3"], "exactly one of train.max_steps or train.num_epochs"),
    (["lr"], "is not key=value"),
    (["data.micro_batch_seconds=600"], "takes both data.micro_batch_seconds and data.global_batch_seconds"),
    (["data.micro_batch_seconds=0", "data.global_batch_seconds=600"], "above 0"),
    (["model.preset=huge"], "choose one of tiny, base, xlsr-300m, large"),
])
def test_mistakes_say_what_to_change(yaml, overrides, message):
    """As a run reads its config (load_run_config: load_config, then the model family's checks)."""
    from asr_dist.plan import load_run_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(yaml, overrides)


def test_a_single_path_is_a_list_of_one(yaml):
    assert load_config(yaml, ["data.train_shards=/data/x"]).data.train_shards == ["/data/x"]
    assert load_config(yaml, ["data.train_shards=[/a,/b]"]).data.train_shards == ["/a", "/b"]


def test_large_is_xlsr_300m(yaml):
    from asr_dist.models.presets import PRESETS

    assert load_config(yaml, ["model.preset=large"]).model.preset == "large"
    assert PRESETS["large"] == PRESETS["xlsr-300m"] and PRESETS["large"]["num_hidden_layers"] == 24


def test_typo_in_yaml(yaml):
    Path(yaml).write_text(Path(yaml).read_text() + "trian:\n  log_every: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'; did you mean 'train'"):
        load_config(yaml)


@pytest.mark.parametrize("world, micro, accumulation", [(1, 16, 2), (2, 16, 1), (2, 8, 2), (8, 4, 1), (8, 2, 2)])
def test_generated_deepspeed_config(yaml, world, micro, accumulation):
    cfg = load_config(yaml, [f"data.micro_batch_size={micro}"])
    ds = deepspeed_config(cfg, world, 1000)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accumulation and micro * accumulation * world == 32
    assert ds["scheduler"]["params"] == {"total_num_steps": 1000, "warmup_min_lr": 0.0, "warmup_max_lr": 1e-4,
                                         "warmup_num_steps": 1000, "warmup_type": "linear"}
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 1
    if world == 1:  # as DeepSpeed reads it: no throughput timer, which synchronises the device every micro-batch
        assert _device_syncs_of_deepspeed_timer(ds) == 0
        assert _device_syncs_of_deepspeed_timer({k: v for k, v in ds.items() if k != "timers"}) > 0  # its default


def _device_syncs_of_deepspeed_timer(ds: dict) -> int:
    """How often DeepSpeed's throughput timer, built from ``ds`` as its engine builds it, synchronises the
    device over 8 micro-batches (the engine starts it in every forward and stops it in every step)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils.timer import ThroughputTimer

    accelerator, calls = get_accelerator(), []
    timer = ThroughputTimer(DeepSpeedConfig(ds).timers_config, batch_size=ds["train_batch_size"])
    real = accelerator.synchronize
    accelerator.synchronize = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for micro in range(8):
            timer.start()
            timer.stop(global_step=micro % 2 == 1, report_speed=False)
    finally:
        del accelerator.synchronize  # the class's method again
    return len(calls)


def test_large_batch_mode_deepspeed_config(yaml):
    """data.micro_batch_seconds: DeepSpeed counts micro-batches (their utterance counts vary)."""
    cfg = load_config(yaml, ["data.micro_batch_seconds=600", "data.global_batch_seconds=4800"])
    ds = deepspeed_config(cfg, 4, 100)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 1, 2)
    with pytest.raises(ConfigError, match=r"micro-batch seconds that divide it on 3 rank\(s\): 1600, 800"):
        deepspeed_config(cfg, 3, 100)


@pytest.mark.parametrize("world, micro, global_batch, hint", [
    (3, 16, 32, "on 3 rank(s): none"), (2, 5, 32, "on 2 rank(s): [1, 2, 4, 8, 16]"),
    (3, 4, 30, "on 3 rank(s): [1, 2, 5, 10]"),
])
def test_batch_sizes_that_do_not_divide(yaml, world, micro, global_batch, hint):
    cfg = load_config(yaml, [f"data.micro_batch_size={micro}", f"data.global_batch_size={global_batch}"])
    with pytest.raises(ConfigError, match="micro batch sizes that divide it") as e:
        deepspeed_config(cfg, world, 10)
    assert hint in str(e.value)


def test_precision_blocks(yaml):
    bf16 = deepspeed_config(load_config(yaml, ["distributed.precision=bf16", "distributed.zero_stage=3"]), 1, 10)
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    assert bf16["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    fp16 = deepspeed_config(load_config(yaml, ["distributed.initial_scale_power=12", "distributed.hysteresis=4"]), 1, 10)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 1000,
                            "hysteresis": 4, "min_loss_scale": 1.0}


def test_pad_to_multiple_of_is_checked(yaml):
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of=0"):
        load_config(yaml, ["data.pad_to_multiple_of=0"])
    assert load_config(yaml, ["data.pad_to_multiple_of=16000"]).data.pad_to_multiple_of == 16000


def test_profile_steps_are_checked(yaml):
    for bad in ("[3]", "[0,2]", "[5,4]", "[a,b]"):
        with pytest.raises(ConfigError, match="train.profile_steps="):
            load_config(yaml, [f"train.profile_steps={bad}"])
    assert load_config(yaml, ["train.profile_steps=[20,22]"]).train.profile_steps == [20, 22]
    assert load_config(yaml, []).train.profile_steps == []


def test_optimizer_is_torch_fused_adamw_on_gpus(yaml):
    cfg = load_config(yaml)
    assert cfg.optim.torch_adam  # no nvcc needed at first use
    assert deepspeed_config(cfg, 1, 10, cuda=True)["optimizer"]["params"]["fused"] is True
    assert "fused" not in deepspeed_config(cfg, 1, 10, cuda=False)["optimizer"]["params"]  # no fused kernel on CPU
    ds = deepspeed_config(load_config(yaml, ["optim.torch_adam=false"]), 1, 10, cuda=True)
    assert "fused" not in ds["optimizer"]["params"] and not ds["optimizer"]["params"]["torch_adam"]
    # ZeRO-Offload (from a user's DeepSpeed JSON) steps on the CPU with DeepSpeed's CPU Adam
    offload = Path(yaml).parent / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    ds = deepspeed_config(load_config(yaml, [f"distributed.deepspeed_config={offload}"]), 1, 10, cuda=True)
    assert "fused" not in ds["optimizer"]["params"] and not ds["optimizer"]["params"]["torch_adam"]


def test_user_deepspeed_json_merges_and_contradictions_fail(yaml, tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"zero_optimization": {"round_robin_gradients": True}, "train_batch_size": "auto",
                              "flops_profiler": {"enabled": False}}))
    ds = deepspeed_config(load_config(yaml, [f"distributed.deepspeed_config={ok}"]), 2, 10)
    assert ds["zero_optimization"]["round_robin_gradients"] and ds["train_batch_size"] == 32 and "flops_profiler" in ds
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4 there but 16") as e:
        deepspeed_config(load_config(yaml, [f"distributed.deepspeed_config={bad}"]), 2, 10)
    assert "bf16.enabled is True there but False" in str(e.value)


def test_shipped_configs_load(tmp_path):
    from asr_dist.config import merge_config

    demo = merge_config(str(REPO / "asr_dist" / "resources" / "demo.yaml"))  # the demo adds paths and sizes
    assert demo.model.preset and demo.distributed.precision in ("fp32", "bf16")  # it runs on a CPU
    cfg = load_config(str(REPO / "configs" / "test.yaml"))
    assert cfg.model.preset == "tiny" and cfg.train.max_steps == 50 and cfg.eval.every_steps == 25
    (tmp_path / "xlsr").mkdir()
    (tmp_path / "xlsr" / "config.json").write_text('{"model_type": "wav2vec2"}')  # what XLS-R-300M's says
    seed = load_config(str(REPO / "configs" / "xlsr300m-danish.yaml"), [f"model.pretrained={tmp_path / 'xlsr'}"])
    # the GPU's fastest precision, packed micro-batches, and the largest micro-batch that fits, for the seed's recipe
    assert (seed.distributed.precision, seed.data.pack, seed.data.micro_batch_size) == ("auto", True, "auto")
    with pytest.raises(ValueError, match="distributed.precision=auto"):
        deepspeed_config(seed, 1, 15 * 1000)  # the plan resolves it first
    from asr_dist.plan import resolve_micro_batch_size, resolve_precision

    resolve_precision(seed, cuda=False)
    assert resolve_micro_batch_size(seed, 1, cuda=False) == []  # settled without a GPU: the seed's 16
    assert seed.distributed.precision == "fp32"
    ds = deepspeed_config(seed, 1, 15 * 1000)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2)
    assert ds["optimizer"]["type"] == "Adam" and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 2000 and not ds["fp16"]["enabled"]
    assert seed.optim.lr == 1e-4 and seed.train.num_epochs == 15 and seed.data.global_batch_size == 32


def test_config_reference_is_current():
    assert (REPO / "docs" / "config.md").read_text() == reference_markdown() + "\n", \
        "docs/config.md is stale: python -m asr_dist.config --markdown > docs/config.md"


@pytest.mark.slow  # three CLI processes, each importing DeepSpeed
def test_train_dry_run_prints_the_plan(tmp_path, corpus_cache):
    from asr_dist.data.writer import BuildOptions, build

    build(BuildOptions(inputs=[corpus_cache("commonvoice", num=40)], output=str(tmp_path / "s"), progress=False))
    out = subprocess.run([sys.executable, "-m", "asr_dist.cli", "train", "--config", str(REPO / "configs" / "test.yaml"),
                          f"data.train_shards=[{tmp_path / 's'}]", "data.eval_shards={}", "--dry-run", "--world-size", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"gradient_accumulation_steps": 1' in out.stdout and "2 steps per epoch" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "asr_dist.cli", "train", "--config", str(REPO / "configs" / "test.yaml"),
                          f"data.train_shards=[{tmp_path / 's'}]", "data.eval_shards={}", "data.micro_batch_size=3", "--dry-run"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "micro batch sizes that divide it" in bad.stderr and "Traceback" not in bad.stderr
    layerdrop = subprocess.run([sys.executable, "-m", "asr_dist.cli", "train", "--config", str(REPO / "configs" / "test.yaml"),
                                f"data.train_shards=[{tmp_path / 's'}]", "data.eval_shards={}", "model.layerdrop=0.1",
                                "model.sync_free_forward=false",
                                "--dry-run", "--world-size", "2"], capture_output=True, text=True)
    assert layerdrop.returncode == 2 and "each rank would skip different layers" in layerdrop.stderr
    groups = subprocess.run([sys.executable, "-m", "asr_dist.cli", "train", "--config", str(REPO / "configs" / "test.yaml"),
                             f"data.train_shards=[{tmp_path / 's'}]", f"data.eval_shards.dev={tmp_path / 's'}",
                             "eval.group_by=[speaker,dialect]", "--dry-run"], capture_output=True, text=True)
    assert groups.returncode == 2 and "Traceback" not in groups.stderr, groups.stderr
    assert "data.eval_shards.dev" in groups.stderr and "no metadata field dialect; fields there: speaker" in groups.stderr


def test_layerdrop_on_several_ranks_needs_shared_draws_and_no_zero3(yaml):
    from asr_dist.deepspeed_config import check_layerdrop

    cfg = load_config(yaml, ["model.layerdrop=0.041"])
    check_layerdrop(cfg, 1, shared_draws=False)
    check_layerdrop(cfg, 8, shared_draws=True)  # the sync-free forward: the same layers on every rank
    with pytest.raises(ConfigError, match="each rank would skip different layers"):
        check_layerdrop(cfg, 2, shared_draws=False)
    with pytest.raises(ConfigError, match="zero_stage=3: DeepSpeed's ZeRO-3 would update a skipped layer"):
        load_config(yaml, ["model.layerdrop=0.041", "distributed.zero_stage=3"])


def test_attention_kernels_agree_and_typos_are_refused():
    import torch

    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3}
    x, mask = torch.randn(2, 16000), torch.ones(2, 16000, dtype=torch.bool)
    mask[1, 8000:] = False  # padding must be masked alike by both kernels
    logits = []
    for kernel in ("sdpa", "eager"):
        model = build_model(ModelArgs(preset="tiny", attention=kernel), vocab)[0].eval()
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logits.append(model(input_values=x, attention_mask=mask).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        load_config(None, ["output_dir=x", "data.train_shards=[x]", "train.max_steps=1", "model.preset=tiny",
                             "model.attention=flash"])


def test_cudnn_attention_is_left_out_unless_asked():
    """The model's attention (and cuDNN autotuning) setting reaches PyTorch's SDPA dispatcher (which kernels it may pick is a
    process-wide flag; tests/gpu checks the kernels a GPU then runs)."""
    import torch

    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3}
    assert load_config(None, ["output_dir=x", "data.train_shards=[x]", "train.max_steps=1",
                              "model.preset=tiny"]).model.cudnn_attention is False
    try:
        build_model(ModelArgs(preset="tiny"), vocab)[0]
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cudnn.benchmark
        build_model(ModelArgs(preset="tiny", cudnn_attention=True, cudnn_benchmark=True), vocab)[0]
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.backends.cudnn.benchmark = False


def _loss_and_grads(model, t: int, grads_of) -> list:
    """One padded batch of two utterances of ``t`` samples through ``model``: its loss and the gradients
    of the parameters ``grads_of(model)`` names."""
    import torch

    torch.manual_seed(t)
    x, mask = torch.randn(2, t), torch.ones(2, t, dtype=torch.bool)
    mask[1, t // 2:] = False
    model.zero_grad()
    out = model(input_values=x, attention_mask=mask, labels=torch.tensor([[3, 4, 2, 3], [4, 3, -100, -100]]))
    out.loss.backward()
    return [out.loss.detach(), *(p.grad for p in grads_of(model))]


def test_fft_positional_conv_trains_like_the_direct_one():
    """model.fft_positional_conv: the same loss and gradients (the weight-normed kernel's too) at several
    lengths, the same parameters and names; a deep copy computes with its own weights."""
    import copy

    import torch

    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model
    from asr_dist.models.wav2vec2 import fft_conv1d

    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4}
    direct = build_model(ModelArgs(preset="tiny", mask_time_prob=0.0), vocab)[0].train()
    fft = build_model(ModelArgs(preset="tiny", mask_time_prob=0.0, fft_positional_conv=True), vocab)[0].train()
    fft.load_state_dict(direct.state_dict())
    assert fft.wav2vec2.encoder.pos_conv_embed.conv._conv_forward.func is fft_conv1d
    assert list(fft.state_dict()) == list(direct.state_dict())
    def params(m):
        conv = m.wav2vec2.encoder.pos_conv_embed.conv
        return conv.parametrizations.weight.original1, conv.bias, m.wav2vec2.feature_projection.projection.weight

    for t in (16000, 23000):
        for a, b in zip(_loss_and_grads(direct, t, params), _loss_and_grads(fft, t, params)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())
    twin = copy.deepcopy(fft)
    with torch.no_grad():
        twin.wav2vec2.encoder.pos_conv_embed.conv.bias.add_(1.0)
    h = torch.randn(1, 50, 192)
    assert not torch.allclose(twin.wav2vec2.encoder.pos_conv_embed(h), fft.wav2vec2.encoder.pos_conv_embed(h))
    # the function itself, at XLS-R's sizes, in bf16 (computed in float32)
    x, w, b = torch.randn(2, 1024, 90), torch.randn(1024, 64, 128) * 0.02, torch.randn(1024)
    ref = torch.nn.functional.conv1d(x, w, b, padding=64, groups=16)
    assert torch.allclose(fft_conv1d(x, w, b, 64, 16), ref, atol=1e-4)
    assert fft_conv1d(x.bfloat16(), w.bfloat16(), b.bfloat16(), 64, 16).dtype == torch.bfloat16


@pytest.mark.slow  # inductor compiles on CPU
def test_compiled_layers_train_like_eager_and_keep_their_names():
    """model.compile: the same loss and gradients as eager at several batch lengths (the transformer
    layers and the feature encoder's norm + GELU, each one compiled graph with a dynamic length: no
    recompilation per length), and the same state_dict keys (checkpoints and exports do not change)."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from asr_dist.config import ModelArgs
    from asr_dist.models import FAMILIES, build_model

    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4}
    eager = build_model(ModelArgs(preset="tiny", mask_time_prob=0.0), vocab)[0].train()
    compiled = copy.deepcopy(eager)
    FAMILIES["wav2vec2"].compile(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    def params(m):
        fe = m.wav2vec2.feature_extractor.conv_layers
        return m.wav2vec2.encoder.layers[0].feed_forward.output_dense.weight, fe[1].layer_norm.weight, fe[0].conv.weight

    graphs = []
    for t in (16000, 24000, 20000):
        grads = [_loss_and_grads(eager, t, params), _loss_and_grads(compiled, t, params)]
        assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-4)
        for a, b in zip(grads[0][1:], grads[1][1:]):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
        graphs.append(counters["stats"]["unique_graphs"])
    # one graph for every transformer layer and length; the feature encoder's norm + GELU: one for its large
    # blocks and one for its small ones (inductor picks its reduction by size); no new graph for new lengths
    assert graphs == [3, 3, 3], (graphs, dict(counters["stats"]))
    assert type(compiled.wav2vec2.feature_extractor.conv_layers[3]).__name__ == "FusedLayerNormConvLayer"


def test_train_dry_run_counts_the_utterances_the_model_cannot_align(tmp_path, corpus_cache, capsys):
    """Shards built for wav2vec2's 50 frames a second, a model with a strided adapter (stride 3, about 16):
    the dry run says how many training utterances it cannot align; for a plain wav2vec2 layout, none."""
    import transformers

    from asr_dist.cli import main
    from asr_dist.data.writer import BuildOptions, build

    build(BuildOptions(inputs=[corpus_cache("commonvoice", num=40)], output=str(tmp_path / "s"), progress=False))
    strided = tmp_path / "strided"
    transformers.Wav2Vec2Config(add_adapter=True, num_adapter_layers=1, adapter_stride=3).save_pretrained(str(strided))
    base = [str(REPO / "configs" / "test.yaml"), f"data.train_shards=[{tmp_path / 's'}]", "data.global_batch_size=8",
            "data.eval_shards={}"]
    assert main(["train", "--config", *base, f"model.pretrained={strided}", "model.preset=null", "--dry-run"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    n = int(line.split(" of 40 training utterances cannot be aligned by ")[0])
    assert 0 < n < 40 and str(strided) in line and "frames needed" in line and "train/skipped_samples" in line, line
    assert main(["train", "--config", *base, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("every training utterance can be aligned by wav2vec2 tiny "
                                                       "(no more CTC labels than frames)")
