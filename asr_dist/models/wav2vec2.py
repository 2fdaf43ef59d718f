"""The wav2vec2 family (XLS-R, MMS, wav2vec2-base/large): Wav2Vec2ForCTC, and what the families
that share its layout reuse (hubert.py, data2vec_audio.py): the sync-free training forward, the FFT
positional convolution, regional compilation with fused feature-encoder blocks.

Hugging Face computes the CTC loss in fp32 (log_softmax(dtype=float32)) with mean reduction;
ctc_zero_infinity drops impossible alignments. The sync-free forward computes the same loss from
host-side lengths (asr_dist.models.ctc).
"""

from __future__ import annotations

import functools
import logging

import torch
import transformers
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2LayerNormConvLayer, _compute_mask_indices

from .presets import PRESETS
from . import ModelError, ModelFamily, register
from . import packed
from .ctc import check_label_ids, ctc_loss, run_layers, to_device

log = logging.getLogger(__name__)


@register
class Wav2Vec2Family(ModelFamily):
    name = "wav2vec2"
    model_types = ("wav2vec2",)
    config_class = transformers.Wav2Vec2Config
    ctc_class = transformers.Wav2Vec2ForCTC
    base_attr = "wav2vec2"
    presets = PRESETS
    sync_free = True
    fft_positional_conv = True
    time_masks_over_padding = False  # SpecAugment's time masks are drawn within each utterance's frames

    def use_sync_free_forward(self, model) -> bool:
        """``model(input_values, lengths=…, labels=…)`` runs ``sync_free_forward``; a call without
        ``lengths`` (evaluation, user code) still runs transformers' own forward. False: not for this model."""
        if getattr(model.config, "add_adapter", False):
            log.info("model.sync_free_forward: not for a model with an adapter; transformers' forward is used")
            return False
        model.forward = functools.partial(sync_free_forward, model, self.base(model), model.forward,
                                          time_masks_over_padding=self.time_masks_over_padding)
        return True

    def packing_refusal(self, config) -> str | None:
        return packed.packing_refusal(config)

    def frame_stride(self, config) -> int:
        return packed.frame_stride(config)

    def use_fft_positional_conv(self, model) -> None:
        use_fft_positional_conv(self.base(model).encoder.pos_conv_embed.conv)

    def compile(self, model) -> None:
        compile_regions(self.base(model))


def _layer_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """What a layer-norm conv block of the feature encoder does after its convolution: layer norm over
    the channels of (batch, channels, time), then GELU. Eager, that is four passes over the largest
    activations of the model (512 channels at 3200 frames per audio second): a transposed copy for
    the norm, the norm, GELU on its transposed result, and the next convolution's contiguous copy;
    compiled, one read and one write."""
    y = torch.nn.functional.layer_norm(x.transpose(-2, -1), (x.shape[-2],), weight, bias, eps)
    return torch.nn.functional.gelu(y.transpose(-2, -1)).contiguous()


_compiled_layer_norm_gelu = None


class FusedLayerNormConvLayer(Wav2Vec2LayerNormConvLayer):
    """The same block and parameters, its norm and activation compiled as one kernel (dynamic length)."""

    def forward(self, hidden_states):
        global _compiled_layer_norm_gelu
        if _compiled_layer_norm_gelu is None:
            _compiled_layer_norm_gelu = torch.compile(_layer_norm_gelu, dynamic=True)
        ln = self.layer_norm
        return _compiled_layer_norm_gelu(self.conv(hidden_states), ln.weight, ln.bias, ln.eps)


def feature_encoder(config) -> torch.nn.Module:
    """wav2vec2's convolutional feature encoder alone (for the kernel benchmarks)."""
    return transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2FeatureEncoder(config)


def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: a length FFT libraries transform fast."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
               groups: int) -> torch.Tensor:
    """``torch.nn.functional.conv1d(x, weight, bias, padding=padding, groups=groups)`` computed with FFTs
    in float32 (the result in x's dtype).

    The cross-correlation of each padded channel with each kernel is a product in the frequency
    domain (a transform of length >= T + 2 * padding, so nothing wraps around), and the sum over a
    group's input channels is a small complex matrix product per frequency. For wav2vec2's positional
    convolution (1024 channels, kernel 128, 16 groups) that is about 40x fewer FLOPs than the direct
    convolution, which cuDNN ran at a few % of the GPU's peak (H200 profile: 8 ms of an 83 ms step)."""
    b, c, t = x.shape
    out_channels, per_group, k = weight.shape
    n = fft_size(t + 2 * padding)
    xf = torch.fft.rfft(torch.nn.functional.pad(x.float(), (padding, padding)), n=n)
    wf = torch.fft.rfft(weight.float(), n=n)
    f = xf.shape[-1]
    yf = torch.einsum("bgcf,gocf->bgof", xf.view(b, groups, per_group, f),
                      wf.view(groups, out_channels // groups, per_group, f).conj())
    y = torch.fft.irfft(yf.reshape(b, out_channels, f), n=n)[..., : t + 2 * padding - k + 1]
    if bias is not None:
        y = y + bias.float()[:, None]
    return y.to(x.dtype)


def use_fft_positional_conv(conv: torch.nn.Conv1d) -> None:
    """The positional convolution computed by ``fft_conv1d``: the same module, parameters, weight norm
    and hooks (DeepSpeed's too); only the arithmetic of its ``_conv_forward`` changes."""
    if conv.padding_mode != "zeros" or not isinstance(conv.padding[0], int):
        raise ModelError(f"model.fft_positional_conv: unexpected positional convolution {conv}")
    conv._conv_forward = functools.partial(fft_conv1d, padding=conv.padding[0], groups=conv.groups)
    log.info("positional convolution (kernel %d, %d groups) computed with FFTs", conv.kernel_size[0], conv.groups)


def compile_regions(encoder_model) -> None:
    """``torch.compile`` every transformer layer in place, and the feature encoder's norm + activation,
    each with a dynamic time dimension.

    Regional compilation: the 24 layers of XLS-R share one compiled graph (parameters are inputs), so
    compiling costs about one layer's time rather than the whole model's, and parameter names stay as
    they are (``Module.compile`` changes no state_dict key: checkpoints and exports are unaffected).
    The layers hold about 95 % of the FLOPs. The convolutions (feature encoder, positional) stay eager:
    compiled, they recompiled at every new batch length even when asked for dynamic shapes (measured,
    torch 2.13), and batch lengths vary at every step; the memory-bound norm and GELU between the
    feature encoder's convolutions compile as one function for all 7 blocks and every length (two
    graphs: inductor picks one reduction for the large blocks and one for the small)."""
    layers = encoder_model.encoder.layers
    for layer in layers:
        layer.compile(dynamic=True)
    fused = 0
    config = encoder_model.config
    if getattr(config, "feat_extract_norm", "layer") == "layer" and config.feat_extract_activation == "gelu":
        for block in encoder_model.feature_extractor.conv_layers:
            if type(block).__name__.endswith("LayerNormConvLayer"):  # the same block in every family that has it
                block.__class__ = FusedLayerNormConvLayer  # same parameters and names, the forward above
                fused += 1
    log.info("torch.compile: %d transformer layers (one shared graph, dynamic length)%s", len(layers),
             f", the norm + GELU of {fused} feature-encoder blocks" if fused else "")


def sync_free_forward(model, w2v, hf_forward, input_values: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      lengths: torch.Tensor | None = None, skip_layers: list[bool] | None = None,
                      starts: torch.Tensor | None = None, *, time_masks_over_padding: bool = False, **kwargs):
    """The *ForCTC forward and CTC loss of the wav2vec2 layout (``w2v``: its encoder model), with every
    mask and length made on the host.

    transformers' forward makes the host wait for the GPU up to nine times per micro-batch: the label
    check (``labels.max()``), SpecAugment's mask (lengths ``.tolist()``, a blocking copy, a boolean
    index), the zeroing of padded frames (a boolean index over batch x frames x 1024), the test whether
    the batch has padding at all (``mask.all()``), and its CTC loss (``masked_select`` of the targets,
    lengths copied back for ``F.ctc_loss``); each wait drains the GPU's queue while Python runs. Here the
    audio ``lengths`` (samples, on the CPU) come from the loader, so the frame mask, SpecAugment's
    masks (transformers' own ``_compute_mask_indices``, drawn from numpy's generator in the same
    order), the padding test and the CTC lengths are computed on the CPU and copied without waiting;
    padded frames are zeroed with ``masked_fill``. Same modules, same order, same random draws:
    the same loss and gradients as transformers' forward (tested). ``labels`` (on the CPU) are moved
    here. What is left is PyTorch's CUDA CTC loss, which copies its offsets to the GPU itself.

    ``time_masks_over_padding``: SpecAugment's time masks drawn over the padded length, as HuBERT's
    forward draws them (it does not pass the padding mask to its mask draw).

    LayerDrop: ``skip_layers`` (from ``layerdrop_draw``: the same on every rank) says which layers to
    skip; without it each layer is drawn from torch's generator, as transformers draws it.

    ``starts``: the micro-batch is packed (``input_values`` (1, S), utterance i at sample starts[i]), and
    asr_dist.models.packed runs it."""
    if lengths is None or kwargs:
        return hf_forward(input_values, attention_mask=attention_mask, labels=labels, **kwargs)
    if starts is not None:  # a packed micro-batch (asr_dist.data.packing): asr_dist.models.packed
        return packed.packed_forward(model, w2v, input_values, starts, lengths, labels, skip_layers,
                                     time_masks_over_padding=time_masks_over_padding)
    cfg = model.config
    enc, device = w2v.encoder, input_values.device
    stable = getattr(cfg, "do_stable_layer_norm", False)  # data2vec-audio has only the post-norm layout
    batch, frames = input_values.shape[0], int(model._get_feat_extract_output_lengths(input_values.shape[1]))
    frame_lengths = model._get_feat_extract_output_lengths(lengths.cpu()).long()
    frame_mask = torch.arange(frames) < frame_lengths[:, None]  # (batch, frames), host
    check_label_ids(labels, cfg.vocab_size)  # host: labels are on the CPU

    # the feature encoder first: the GPU runs it while the host draws SpecAugment's masks
    hidden = w2v.feature_projection(w2v.feature_extractor(input_values).transpose(1, 2))
    if isinstance(hidden, tuple):  # wav2vec2's returns (hidden, normed features), HuBERT's the hidden states
        hidden = hidden[0]
    time_mask = feature_mask = None  # SpecAugment, as transformers draws it: time, then channels
    if model.training and getattr(cfg, "apply_spec_augment", True):
        if cfg.mask_time_prob > 0:
            time_mask = to_device(torch.from_numpy(_compute_mask_indices(
                (batch, frames), mask_prob=cfg.mask_time_prob, mask_length=cfg.mask_time_length,
                attention_mask=None if time_masks_over_padding else frame_mask, min_masks=cfg.mask_time_min_masks)),
                device)
        if cfg.mask_feature_prob > 0:
            feature_mask = to_device(torch.from_numpy(_compute_mask_indices(
                (batch, cfg.hidden_size), mask_prob=cfg.mask_feature_prob, mask_length=cfg.mask_feature_length,
                min_masks=cfg.mask_feature_min_masks)), device)
    if time_mask is not None:
        hidden = torch.where(time_mask[..., None], w2v.masked_spec_embed.to(hidden.dtype), hidden)
    if feature_mask is not None:
        hidden = hidden.masked_fill(feature_mask[:, None, :], 0)
    attention = None
    if bool((frame_lengths < frames).any()):  # padding: zero its frames and keep attention off them
        mask = to_device(frame_mask, device)
        hidden = hidden.masked_fill(~mask[..., None], 0)
        attention = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask,
                                              allow_is_bidirectional_skip=False)
    hidden = hidden + enc.pos_conv_embed(hidden)
    hidden = enc.dropout(hidden if stable else enc.layer_norm(hidden))
    hidden = run_layers(enc.layers, hidden, attention, model.training, cfg.layerdrop, skip_layers)
    if stable:
        hidden = enc.layer_norm(hidden)
    logits = model.lm_head(model.dropout(hidden))
    loss = None
    if labels is not None:
        loss = ctc_loss(logits, labels.cpu(), frame_lengths, cfg.pad_token_id, cfg.ctc_loss_reduction,
                        cfg.ctc_zero_infinity)
    return CausalLMOutput(loss=loss, logits=logits)


