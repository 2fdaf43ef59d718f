"""data.pack: packed micro-batches (asr_dist.data.packing, asr_dist.models.packed) against the padded sync-free
forward of the same utterances, and against each utterance alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asr_dist.config import ConfigError, ModelArgs
from asr_dist.data.packing import pack
from asr_dist.data.samples import collate
from asr_dist.models import FAMILIES, build_model
from asr_dist.models.presets import PRESETS

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}
LENGTHS = [16000, 9000, 23456, 4321]  # samples: starts off the frame grid, and a short one


def _batch(lengths=LENGTHS, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return collate([(f"u{i}", rng.standard_normal(n).astype(np.float32), list(rng.integers(3, 13, 4 + 3 * i)), "")
                    for i, n in enumerate(lengths)])


def _model(family: str, stable: bool = True, **args):
    """The family's tiny preset; ``stable=False``: wav2vec2 in the post-norm layout (wav2vec2-base's, and
    data2vec-audio's only one) with a layer-norm feature encoder."""
    torch.manual_seed(0)
    if stable:
        model, fam = build_model(ModelArgs(preset="tiny", family=family, **args), VOCAB)
    else:
        fam = FAMILIES[family]
        config = fam.config_class(**{**PRESETS["tiny"], "do_stable_layer_norm": False},
                                  **fam.overrides(ModelArgs(preset="tiny", **args), VOCAB))
        model = fam.ctc_class(config)
    assert fam.use_sync_free_forward(model)
    return model.train(), fam


def _run(model, call) -> tuple:
    """Loss, logits and gradients of one forward/backward, with numpy's generator (SpecAugment) seeded alike."""
    model.zero_grad()
    np.random.seed(3)
    out = call()
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}


@pytest.mark.parametrize("family, stable", [("wav2vec2", True), ("wav2vec2", False), ("hubert", True),
                                             ("data2vec-audio", True)])
def test_packed_equals_padded_with_specaugment_and_layerdrop(family, stable):
    """Each utterance's logits, the loss and every gradient: packed as padded, with SpecAugment's time and channel
    masks drawn from the same seed and the same layers dropped."""
    model, fam = _model(family, stable, mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.2,
                        mask_feature_length=8)
    b = _batch()
    p = pack(b, fam.frame_stride(model.config))
    skips = [False, True, False, False]
    lengths = b["attention_mask"].sum(-1)
    loss_a, logits_a, grads_a = _run(model, lambda: model(input_values=b["input_values"], lengths=lengths,
                                                          labels=b["labels"], skip_layers=skips))
    loss_p, logits_p, grads_p = _run(model, lambda: model(input_values=p["input_values"], starts=p["starts"],
                                                          lengths=p["lengths"], labels=p["labels"], skip_layers=skips))
    frames = model._get_feat_extract_output_lengths(lengths).tolist()
    for i, f in enumerate(frames):
        assert torch.allclose(logits_p[i, :f], logits_a[i, :f], atol=1e-5), (i, float((logits_p[i, :f] - logits_a[i, :f]).abs().max()))
    assert torch.allclose(loss_p, loss_a, rtol=1e-6), (float(loss_p), float(loss_a))
    assert grads_p.keys() == grads_a.keys()
    for name, g in grads_a.items():
        assert float((grads_p[name] - g).norm()) <= 1e-4 * float(g.norm()) + 1e-7, name
    # the masks mattered: without them the loss is another
    model.config.mask_time_prob = model.config.mask_feature_prob = 0.0
    loss_plain, _, _ = _run(model, lambda: model(input_values=p["input_values"], starts=p["starts"],
                                                 lengths=p["lengths"], labels=p["labels"], skip_layers=skips))
    assert not torch.allclose(loss_plain, loss_p, rtol=1e-4)


def test_packed_utterances_are_as_each_alone():
    """No neighbour reaches an utterance: the feature encoder, the positional convolution (kernel 64 in the tiny
    preset, 128 in XLS-R's) and attention see only its own samples and frames."""
    model, fam = _model("wav2vec2")
    model.eval()  # no SpecAugment: each run alone would draw its own masks
    b = _batch()
    p = pack(b, fam.frame_stride(model.config))
    with torch.no_grad():
        packed = model(input_values=p["input_values"], starts=p["starts"], lengths=p["lengths"],
                       labels=p["labels"]).logits
        for i, n in enumerate(LENGTHS):
            alone = model(input_values=b["input_values"][i:i + 1, :n], lengths=torch.tensor([n]),
                          labels=b["labels"][i:i + 1]).logits[0]
            assert torch.allclose(packed[i, :len(alone)], alone, atol=1e-5), (i, float((packed[i, :len(alone)] - alone).abs().max()))


def test_what_cannot_pack_is_refused_before_any_model_work(train_shards, tmp_path):
    from pathlib import Path

    from asr_dist.config import load_config
    from asr_dist.plan import plan_run

    repo = Path(__file__).resolve().parents[2]
    base = [f"output_dir={tmp_path}", f"data.train_shards=[{train_shards / 's-train'}]", "data.eval_shards={}",
            "data.global_batch_size=8", "data.micro_batch_size=2", "data.pack=true"]
    plan = plan_run(load_config(str(repo / "configs" / "test.yaml"), base), 1)
    assert plan.pack_align == 320
    for extra, why in ((["model.preset=base"], "group norm over the whole sequence"),
                       (["model.family=wav2vec2-conformer"], "has no packed forward"),
                       (["model.family=wav2vec2-bert"], "has no packed forward"),
                       (["model.sync_free_forward=false"], "sync-free forward"),
                       (["model.attention=flash_attention_2"], "takes no document mask")):
        with pytest.raises(ConfigError, match=f"data.pack=true with .*{why}.*Set data.pack=false"):
            plan_run(load_config(str(repo / "configs" / "test.yaml"), base + extra), 1)
    with pytest.raises(ConfigError, match="flex attention has no backward there"):
        plan_run(load_config(str(repo / "configs" / "test.yaml"), base + ["model.attention=flex_attention"]), 1)
    assert FAMILIES["wavlm"].packing_refusal(None) is not None


@pytest.mark.slow  # flex attention compiles its kernel on first use (about 20 s on CPU)
def test_flex_attention_packs_as_sdpa_does():
    """model.attention=flex_attention: transformers builds a block mask from the same document mask (on a GPU its
    kernel skips the blocks between utterances); the packed logits equal sdpa's."""
    b = _batch()
    logits = {}
    for attention in ("sdpa", "flex_attention"):
        model, fam = _model("wav2vec2", attention=attention)
        assert model.config._attn_implementation == attention
        p = pack(b, fam.frame_stride(model.config))
        with torch.no_grad():
            logits[attention] = model.eval()(input_values=p["input_values"], starts=p["starts"],
                                             lengths=p["lengths"]).logits
    assert torch.allclose(logits["flex_attention"], logits["sdpa"], atol=1e-5)


@pytest.mark.slow  # inductor compiles on CPU
def test_compiled_layers_take_packed_batches_without_new_graphs():
    """model.compile with packing: micro-batches of other utterances at the same capacity, and at another
    capacity, run the graphs the first one made (no recompilation per batch), with the eager packed loss."""
    import copy

    from torch._dynamo.utils import counters

    eager, fam = _model("wav2vec2")
    compiled = copy.deepcopy(eager)
    fam.compile(compiled)
    assert fam.use_sync_free_forward(compiled)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for lengths, capacity in (([16000, 9000, 23456], 64000), ([5000, 30000, 12000], 64000), ([7000, 8000], 32000)):
        p = pack(_batch(lengths, seed=len(graphs)), 320, capacity)
        losses = []
        for model in (eager, compiled):
            np.random.seed(0)
            losses.append(model(input_values=p["input_values"], starts=p["starts"], lengths=p["lengths"],
                                labels=p["labels"]).loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, (graphs, dict(counters["stats"]))


def test_the_packed_forward_never_reads_the_device():
    """On the meta device (shapes, no data) the packed forward, loss and backward run: every index, mask and
    length is made on the host, as in the padded sync-free forward."""
    from test_forward import MetaCTC

    model, fam = _model("wav2vec2", mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.2,
                        mask_feature_length=8)
    model = model.to("meta")
    p = pack(_batch(), 320, 64000)
    with MetaCTC() as ctc:
        out = model(input_values=torch.empty(p["input_values"].shape, device="meta"), starts=p["starts"],
                    lengths=p["lengths"], labels=p["labels"])
        assert out.loss.device.type == "meta" and out.logits.shape[:2] == (4, 73)
        out.loss.backward()
    (forward,) = [d for name, d in ctc.devices.items() if "backward" not in name]
    assert forward == ["meta", "meta", "cpu", "cpu"], ctc.devices
