"""model.sync_free_forward: transformers' Wav2Vec2ForCTC forward and CTC loss with every mask and
length made on the host. The same numbers as transformers' forward, and nothing read back from the
device (checked on PyTorch's meta device, which holds no data: any read of it fails)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from asr_dist.config import ModelArgs
from asr_dist.data.samples import collate
from asr_dist.models.presets import PRESETS
from asr_dist.models import FAMILIES, build_model
from asr_dist.models.ctc import ctc_loss, layerdrop_draw

W2V = FAMILIES["wav2vec2"]
use_sync_free_forward, model_overrides = W2V.use_sync_free_forward, W2V.overrides

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}
ARGS = ModelArgs(preset="tiny", mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.2, mask_feature_length=8,
                 hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, feat_proj_dropout=0.1,
                 final_dropout=0.1, layerdrop=0.3)


def _model(stable_layer_norm: bool) -> transformers.Wav2Vec2ForCTC:
    """The tiny preset with SpecAugment (time and channels), every dropout and LayerDrop on; XLS-R's
    layout (layer norm first) or wav2vec2-base's (layer norm after each block)."""
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(**{**PRESETS["tiny"], "do_stable_layer_norm": stable_layer_norm},
                                         **model_overrides(ARGS, VOCAB))
    return transformers.Wav2Vec2ForCTC(config).train()


def _batch(lengths: list[int]):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor(lengths)
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    x = torch.randn(len(lengths), mask.shape[1], generator=g) * mask
    labels = torch.full((len(lengths), 8), -100)
    for i in range(len(lengths)):
        labels[i, : 3 + i] = torch.randint(3, len(VOCAB), (3 + i,), generator=g)
    return x, mask, labels


def _run(model, x, **inputs):
    torch.manual_seed(5)  # dropout, LayerDrop
    np.random.seed(5)  # SpecAugment's masks (transformers draws them from numpy)
    model.zero_grad()
    out = model(x, **inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stable_layer_norm, checkpointing", [(True, False), (False, False), (True, True)],
                         ids=["xlsr-layout", "base-layout", "xlsr-layout-gradient-checkpointing"])
@pytest.mark.parametrize("lengths", [[16000, 12000, 9000], [12000, 12000]], ids=["padded", "no-padding"])
def test_sync_free_forward_trains_like_transformers(stable_layer_norm, checkpointing, lengths):
    """The same loss, logits and gradients (every parameter's, SpecAugment's embedding's too) as
    transformers' forward, with SpecAugment, dropout and LayerDrop drawing from the same generators
    (and with the layers' activations recomputed in the backward: model.gradient_checkpointing)."""
    hf = _model(stable_layer_norm)
    if checkpointing:
        getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    ours = copy.deepcopy(hf)
    assert use_sync_free_forward(ours)
    x, mask, labels = _batch(lengths)
    a, grads_a = _run(hf, x, attention_mask=mask, labels=labels)
    b, grads_b = _run(ours, x, lengths=mask.sum(-1), labels=labels)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and "wav2vec2.masked_spec_embed" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
    # without lengths (evaluation, user code) the model runs transformers' forward
    ours.eval(), hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attention_mask=mask).logits, hf(x, attention_mask=mask).logits)


class MetaCTC(torch.utils._python_dispatch.TorchDispatchMode):
    """PyTorch's CTC loss has no meta kernel: this stands in for it (and its backward) on meta tensors,
    recording on which device each of its tensor arguments was."""

    def __init__(self):
        super().__init__()
        self.devices = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "ctc_loss" not in func.name() or "_ctc_loss" not in func.name():
            return func(*args, **(kwargs or {}))
        self.devices[func.name()] = [a.device.type for a in args if isinstance(a, torch.Tensor)]
        if "backward" in func.name():
            return torch.empty_like(args[1])  # (grad, log_probs, …): the gradient of log_probs
        log_probs, targets = args[0], args[1]
        return (torch.empty(log_probs.shape[1], device="meta", dtype=log_probs.dtype),
                torch.empty(log_probs.shape[1], log_probs.shape[0], 2 * targets.shape[-1] + 1, device="meta",
                            dtype=log_probs.dtype))


def test_sync_free_forward_never_reads_the_device():
    """On the meta device (shapes, no data) the whole forward, loss and backward run: no mask, length
    or check looks at a value on the device, and the CTC loss gets its lengths from the host (its
    targets are copied to the device). transformers' forward cannot: it reads the labels' maximum,
    the lengths for SpecAugment and the padding mask, and selects the targets on the device."""
    model = build_model(ARGS, VOCAB)[0].to("meta").train()
    stock = copy.deepcopy(model)
    use_sync_free_forward(model)
    _, mask, labels = _batch([16000, 12000, 9000])
    x = torch.empty(mask.shape, device="meta")
    with MetaCTC() as ctc:
        out = model(x, lengths=mask.sum(-1), labels=labels)
        assert out.loss.device.type == "meta" and out.logits.shape[:2] == (3, 49)
        out.loss.backward()
    assert model.wav2vec2.masked_spec_embed.grad is not None
    (forward,) = [d for name, d in ctc.devices.items() if "backward" not in name]
    assert forward == ["meta", "meta", "cpu", "cpu"], ctc.devices  # log_probs, targets, frame and target lengths
    assert any("backward" in name for name in ctc.devices)
    with MetaCTC(), pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        stock(x, attention_mask=mask.to("meta"), labels=labels.to("meta"))


def test_layerdrop_skips_the_drawn_layers_alike_for_every_rank():
    """LayerDrop's layers come from (seed, step) alone: every rank and micro-batch of a step, and a
    resumed run, draw the same ones; the skipped layers get no gradient, the others do."""
    draws = [layerdrop_draw(0.3, 24, seed=42, step=s) for s in range(400)]
    assert draws == [layerdrop_draw(0.3, 24, seed=42, step=s) for s in range(400)]
    assert draws != [layerdrop_draw(0.3, 24, seed=43, step=s) for s in range(400)]
    assert len({tuple(d) for d in draws}) > 350  # a new draw at every step
    assert np.mean(draws) == pytest.approx(0.3, abs=0.01)  # 9600 draws
    assert not any(any(d) for d in (layerdrop_draw(0.0, 24, seed=42, step=s) for s in range(100)))

    model = _model(stable_layer_norm=True)
    use_sync_free_forward(model)
    x, mask, labels = _batch([16000, 12000, 9000])
    skip = [True, False, True, False]
    _, grads = _run(model, x, lengths=mask.sum(-1), labels=labels, skip_layers=skip)
    for i, skipped in enumerate(skip):
        has_grad = {f"wav2vec2.encoder.layers.{i}.{n}" in grads for n, _ in model.wav2vec2.encoder.layers[i].named_parameters()}
        assert has_grad == {not skipped}, (i, has_grad)
    # in evaluation no layer is skipped, whatever the draw
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, lengths=mask.sum(-1), skip_layers=[True] * 4).logits,
                                   model(x, attention_mask=mask).logits)


def test_ctc_loss_from_host_targets():
    """transformers' CTC loss (fp32 log-softmax, -100 dropped, targets flattened, mean per target length)
    and its gradient, from labels and lengths on the host; a blank in the labels is dropped, as
    transformers does since 5.2x (asr-dist's labels never hold one)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(3, 20, len(VOCAB), requires_grad=True)
    labels = torch.tensor([[3, 4, 5, -100, -100], [6, 6, 7, 8, 9], [3, -100, -100, -100, -100]])
    frames = torch.tensor([20, 15, 9])
    keep = labels >= 0
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    reference = F.ctc_loss(log_probs, labels.masked_select(keep), frames, keep.sum(-1), blank=0, zero_infinity=True)
    ours = ctc_loss(logits, labels, frames, blank=0)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    (g_ref,) = torch.autograd.grad(reference, logits)
    (g_ours,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(g_ref, g_ours)
    with_blank = torch.tensor([[3, 0, 4, 5, -100], [6, 6, 7, 8, 9], [0, 3, -100, -100, -100]])
    assert ctc_loss(logits, with_blank, frames, blank=0).item() == pytest.approx(ours.item(), rel=1e-6)


@pytest.mark.slow  # inductor compiles on CPU
def test_compiled_layers_run_under_the_sync_free_forward():
    """model.compile with the sync-free forward (the engine's pairing): the compiled layers and feature
    encoder blocks are the ones called (the same graphs, none new for a new length), with the loss of
    transformers' eager forward."""
    from torch._dynamo.utils import counters

    eager = build_model(ModelArgs(preset="tiny", mask_time_prob=0.0), VOCAB)[0].train()
    compiled = copy.deepcopy(eager)
    W2V.compile(compiled)
    assert use_sync_free_forward(compiled)
    torch._dynamo.reset()
    counters.clear()
    labels = torch.tensor([[3, 4, 5, 3], [4, 3, -100, -100]])
    for t in (16000, 24000):
        torch.manual_seed(t)
        x, mask = torch.randn(2, t), torch.ones(2, t, dtype=torch.bool)
        mask[1, t // 2:] = False
        want = eager(x, attention_mask=mask, labels=labels).loss
        got = compiled(x, lengths=mask.sum(-1), labels=labels).loss
        assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


# ── every family: the sync-free forward, gradient checkpointing, adapters ──

# SpecAugment (time and channels), every dropout and LayerDrop on
RANDOMNESS = dict(mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.2, mask_feature_length=8, hidden_dropout=0.1,
                  attention_dropout=0.1, activation_dropout=0.1, feat_proj_dropout=0.1, final_dropout=0.1, layerdrop=0.3)


def loss_and_grads(model, x, labels, **inputs):
    """One forward and backward from the same random state (SpecAugment's and LayerDrop's draws): the
    output and every parameter's gradient."""
    torch.manual_seed(5)
    np.random.seed(5)
    model.zero_grad()
    out = model(x, labels=labels, **inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.sync_free])
def test_sync_free_forward_trains_like_transformers_in_every_family_that_has_it(name):
    """The same loss, logits and gradients as the family's own transformers forward, with SpecAugment,
    every dropout and LayerDrop drawing from the same generators, on a padded batch."""
    torch.manual_seed(0)
    hf, family = build_model(ModelArgs(preset="tiny", family=name, **RANDOMNESS), VOCAB)
    hf.train()
    ours = copy.deepcopy(hf)
    assert family.use_sync_free_forward(ours)
    lengths = torch.tensor([16000, 12000, 9000])
    mask = torch.arange(16000)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16000, generator=g) * mask
    labels = torch.full((3, 8), -100)
    for i in range(3):
        labels[i, : 3 + i] = torch.randint(3, len(VOCAB), (3 + i,), generator=g)

    a, grads_a = loss_and_grads(hf, x, labels, attention_mask=mask)
    b, grads_b = loss_and_grads(ours, x, labels, lengths=lengths)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and f"{family.base_attr}.masked_spec_embed" in grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if not f.sync_free])
def test_families_without_the_sync_free_forward_keep_transformers_forward(name):
    model, family = build_model(ModelArgs(preset="tiny", family=name), VOCAB)
    forward = model.forward
    assert not family.use_sync_free_forward(model) and model.forward == forward


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_checkpointing_trains_alike_in_every_family(name):
    """model.gradient_checkpointing: the same loss and gradients, with the layers' activations recomputed."""
    torch.manual_seed(0)
    plain, family = build_model(ModelArgs(preset="tiny", family=name, mask_time_prob=0.0), VOCAB)
    checkpointed = copy.deepcopy(plain)
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    assert checkpointed.is_gradient_checkpointing
    audio = torch.randn(2, 12000, generator=torch.Generator().manual_seed(0)).numpy()
    batch = collate([("a", family.featurizer()(audio[0]), [3, 4, 5, 6], ""),
                     ("b", family.featurizer()(audio[1, :8000]), [7, 8], "")], seconds=[0.75, 0.5])
    x, mask, labels = batch["input_values"], batch["attention_mask"], batch["labels"]
    grads = []
    for model in (plain.train(), checkpointed.train()):
        torch.manual_seed(1)  # the conformer's convolution module keeps its checkpoint's dropout (0.1)
        out = model(x, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append((out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6) and grads[0][1].keys() == grads[1][1].keys()
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_sync_free_forward_with_adapters_trains_like_transformers():
    """The adapter inside each encoder layer: the same loss, logits and adapter gradients either way."""
    torch.manual_seed(0)
    hf, family = build_model(ModelArgs(preset="tiny", train_adapters_only=True, adapter_language="dan", **RANDOMNESS), VOCAB)
    with torch.no_grad():  # adapters that change the hidden states (their fresh init is near zero)
        for name, p in family.adapter_weights(hf).items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    hf.train()
    ours = copy.deepcopy(hf)
    assert family.use_sync_free_forward(ours)
    lengths = torch.tensor([16000, 11000])
    mask = torch.arange(16000)[None] < lengths[:, None]
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1)) * mask
    labels = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 3, -100, -100]])

    a, grads_a = loss_and_grads(hf, x, labels, attention_mask=mask)
    b, grads_b = loss_and_grads(ours, x, labels, lengths=lengths)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert set(grads_a) == set(grads_b) and "lm_head.weight" in grads_a  # (LayerDrop skips some layers' adapters)
    assert set(grads_a) <= set(family.adapter_weights(hf)) and any(".adapter_layer." in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7, msg=n)
