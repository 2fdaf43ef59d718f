"""The model: a transformers Wav2Vec2ForCTC, from a local checkpoint or a size preset.

It knows nothing of ranks or DeepSpeed (the engine wraps it). The CTC head is sized from the shard
set's vocab.json; [PAD] is the CTC blank. Hugging Face computes the CTC loss in fp32
(log_softmax(dtype=float32)) with mean reduction; ctc_zero_infinity drops impossible alignments.
"""

from __future__ import annotations

import functools
import logging

import torch
import transformers
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from .config import PRESETS, ModelArgs
from .text import PAD_TOKEN

log = logging.getLogger(__name__)


def model_overrides(args: ModelArgs, vocab: dict[str, int]) -> dict:
    return dict(
        vocab_size=len(vocab), pad_token_id=vocab[PAD_TOKEN], ctc_loss_reduction="mean", ctc_zero_infinity=True,
        layerdrop=args.layerdrop, mask_time_prob=args.mask_time_prob, mask_time_length=args.mask_time_length,
        mask_feature_prob=args.mask_feature_prob, mask_feature_length=args.mask_feature_length,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        activation_dropout=args.activation_dropout, feat_proj_dropout=args.feat_proj_dropout,
        final_dropout=args.final_dropout,
    )


def set_kernels(args: ModelArgs) -> None:
    """The process-wide kernel choices of a training run: attention (below) and cuDNN's autotuning."""
    set_attention_kernels(args.cudnn_attention)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark


def set_attention_kernels(cudnn_attention: bool = False) -> None:
    """Which fused attention kernels PyTorch's SDPA may pick (a process-wide setting).

    On Hopper GPUs PyTorch prefers cuDNN's fused attention, and cuDNN builds (and compiles) an
    execution graph for every new (batch, length) shape, forward and backward: reported at 55 ms to
    1 s each. Speech batches change length at almost every step, so by default it is left out and
    SDPA uses the flash or memory-efficient kernels, which need no per-shape planning
    (``model.cudnn_attention=true`` lets cuDNN in again: for fixed shapes it is the faster kernel)."""
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)


def build_model(args: ModelArgs, vocab: dict[str, int], seed: int = 0) -> transformers.Wav2Vec2ForCTC:
    """A Wav2Vec2ForCTC with its feature encoder frozen (when asked), ready for DeepSpeed."""
    torch.manual_seed(seed)
    set_kernels(args)
    overrides = model_overrides(args, vocab)
    if args.pretrained:
        model = transformers.Wav2Vec2ForCTC.from_pretrained(args.pretrained, local_files_only=True,
                                                            ignore_mismatched_sizes=True,
                                                            attn_implementation=args.attention, **overrides)
    else:
        config = transformers.Wav2Vec2Config(**PRESETS[args.preset], **overrides)
        config._attn_implementation = args.attention
        model = transformers.Wav2Vec2ForCTC(config)
    freeze = args.freeze_feature_encoder if args.freeze_feature_encoder is not None else bool(args.pretrained)
    if freeze:  # a pretrained front end is kept; a random one (a preset) has to learn
        model.freeze_feature_encoder()
    if args.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns); 5.17, on the GPU machines, has only the old one
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if args.fft_positional_conv:
        use_fft_positional_conv(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("Wav2Vec2ForCTC %s: %.1f M parameters, %.1f M trainable", args.pretrained or args.preset,
             sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6)
    return model


def _layer_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """What a layer-norm conv block of the feature encoder does after its convolution: layer norm over
    the channels of (batch, channels, time), then GELU. Eager, that is four passes over the largest
    activations of the model (512 channels at 3200 frames per audio second): a transposed copy for
    the norm, the norm, GELU on its transposed result, and the next convolution's contiguous copy;
    compiled, one read and one write."""
    y = torch.nn.functional.layer_norm(x.transpose(-2, -1), (x.shape[-2],), weight, bias, eps)
    return torch.nn.functional.gelu(y.transpose(-2, -1)).contiguous()


_compiled_layer_norm_gelu = None


class FusedLayerNormConvLayer(transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2LayerNormConvLayer):
    """The same block and parameters, its norm and activation compiled as one kernel (dynamic length)."""

    def forward(self, hidden_states):
        global _compiled_layer_norm_gelu
        if _compiled_layer_norm_gelu is None:
            _compiled_layer_norm_gelu = torch.compile(_layer_norm_gelu, dynamic=True)
        ln = self.layer_norm
        return _compiled_layer_norm_gelu(self.conv(hidden_states), ln.weight, ln.bias, ln.eps)


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


def use_fft_positional_conv(model: transformers.Wav2Vec2ForCTC) -> None:
    """The positional convolution computed by ``fft_conv1d``: the same module, parameters, weight norm
    and hooks (DeepSpeed's too); only the arithmetic of its ``_conv_forward`` changes."""
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    if conv.padding_mode != "zeros" or not isinstance(conv.padding[0], int):
        raise ValueError(f"model.fft_positional_conv: unexpected positional convolution {conv}")
    conv._conv_forward = functools.partial(fft_conv1d, padding=conv.padding[0], groups=conv.groups)
    log.info("positional convolution (kernel %d, %d groups) computed with FFTs", conv.kernel_size[0], conv.groups)


def compile_regions(model: transformers.Wav2Vec2ForCTC) -> None:
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
    layers = model.wav2vec2.encoder.layers
    for layer in layers:
        layer.compile(dynamic=True)
    fused = 0
    if model.config.feat_extract_norm == "layer" and model.config.feat_extract_activation == "gelu":
        for block in model.wav2vec2.feature_extractor.conv_layers:
            block.__class__ = FusedLayerNormConvLayer  # same parameters and names, the forward above
            fused += 1
    log.info("torch.compile: %d transformer layers (one shared graph, dynamic length)%s", len(layers),
             f", the norm + GELU of {fused} feature-encoder blocks" if fused else "")


def use_sync_free_forward(model: transformers.Wav2Vec2ForCTC) -> bool:
    """``model(input_values, lengths=…, labels=…)`` runs ``sync_free_forward``; a call without
    ``lengths`` (evaluation, user code) still runs transformers' own forward. False: not for this model."""
    if model.config.add_adapter:
        log.info("model.sync_free_forward: not for a model with an adapter; transformers' forward is used")
        return False
    model.forward = functools.partial(sync_free_forward, model, model.forward)
    return True


def sync_free_forward(model: transformers.Wav2Vec2ForCTC, hf_forward, input_values: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      lengths: torch.Tensor | None = None, skip_layers: list[bool] | None = None, **kwargs):
    """Wav2Vec2ForCTC's forward and CTC loss, with every mask and length made on the host.

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

    LayerDrop: ``skip_layers`` (from ``layerdrop_draw``: the same on every rank) says which layers to
    skip; without it each layer is drawn from torch's generator, as transformers draws it."""
    if lengths is None or kwargs:
        return hf_forward(input_values, attention_mask=attention_mask, labels=labels, **kwargs)
    cfg, w2v = model.config, model.wav2vec2
    enc, device = w2v.encoder, input_values.device
    batch, frames = input_values.shape[0], int(model._get_feat_extract_output_lengths(input_values.shape[1]))
    frame_lengths = model._get_feat_extract_output_lengths(lengths.cpu()).long()
    frame_mask = torch.arange(frames) < frame_lengths[:, None]  # (batch, frames), host
    if labels is not None and labels.max() >= cfg.vocab_size:  # host: labels are on the CPU
        raise ValueError(f"label id {int(labels.max())} is outside the model's vocabulary of {cfg.vocab_size}: "
                         f"the shards' vocab.json is not the one the CTC head was sized for")

    # the feature encoder first: the GPU runs it while the host draws SpecAugment's masks
    hidden, _ = w2v.feature_projection(w2v.feature_extractor(input_values).transpose(1, 2))
    time_mask = feature_mask = None  # SpecAugment, as transformers draws it: time, then channels
    if model.training and getattr(cfg, "apply_spec_augment", True):
        if cfg.mask_time_prob > 0:
            time_mask = _to_device(torch.from_numpy(_compute_mask_indices(
                (batch, frames), mask_prob=cfg.mask_time_prob, mask_length=cfg.mask_time_length,
                attention_mask=frame_mask, min_masks=cfg.mask_time_min_masks)), device)
        if cfg.mask_feature_prob > 0:
            feature_mask = _to_device(torch.from_numpy(_compute_mask_indices(
                (batch, cfg.hidden_size), mask_prob=cfg.mask_feature_prob, mask_length=cfg.mask_feature_length,
                min_masks=cfg.mask_feature_min_masks)), device)
    if time_mask is not None:
        hidden = torch.where(time_mask[..., None], w2v.masked_spec_embed.to(hidden.dtype), hidden)
    if feature_mask is not None:
        hidden = hidden.masked_fill(feature_mask[:, None, :], 0)
    attention = None
    if bool((frame_lengths < frames).any()):  # padding: zero its frames and keep attention off them
        mask = _to_device(frame_mask, device)
        hidden = hidden.masked_fill(~mask[..., None], 0)
        attention = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask,
                                              allow_is_bidirectional_skip=False)
    hidden = hidden + enc.pos_conv_embed(hidden)
    hidden = enc.dropout(hidden if cfg.do_stable_layer_norm else enc.layer_norm(hidden))
    every_layer = is_deepspeed_zero3_enabled()  # ZeRO-3 gathers each layer's weights on every rank
    for i, layer in enumerate(enc.layers):
        if skip_layers is not None:
            skip = model.training and skip_layers[i]
        else:
            skip = model.training and cfg.layerdrop > 0.0 and bool(torch.rand([]) < cfg.layerdrop)
        if not skip or every_layer:
            hidden = layer(hidden, attention_mask=attention)
    if cfg.do_stable_layer_norm:
        hidden = enc.layer_norm(hidden)
    logits = model.lm_head(model.dropout(hidden))
    loss = None
    if labels is not None:
        loss = ctc_loss(logits, labels.cpu(), frame_lengths, cfg.pad_token_id, cfg.ctc_loss_reduction,
                        cfg.ctc_zero_infinity)
    return CausalLMOutput(loss=loss, logits=logits)


def layerdrop_draw(probability: float, layers: int, seed: int, step: int) -> list[bool]:
    """Which transformer layers LayerDrop skips in optimizer step ``step``: drawn from a generator
    seeded with (seed, step) alone, so every rank and every micro-batch of the step skips the same
    layers (DeepSpeed then reduces gradients of the same parameters on every rank), a resumed run
    draws what the uninterrupted one drew, and 1 or N ranks draw alike."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.rand(layers, generator=generator) < probability).tolist()


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor, frame_lengths: torch.Tensor, blank: int,
             reduction: str = "mean", zero_infinity: bool = True) -> torch.Tensor:
    """transformers' CTC loss (fp32 log-softmax; labels -100 and blank dropped; "mean": per target
    length, then over the batch; "per_token": per target length, each utterance's; "sum"; "none")
    from labels and lengths on the CPU: the targets are packed there, as
    a (batch, longest) block, and the lengths stay there, so ``F.ctc_loss`` copies nothing back from
    the GPU (given lengths on the GPU, it would)."""
    keep = (labels >= 0) & (labels != blank)
    target_lengths = keep.sum(-1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # each row's kept labels first, in order
    width = max(1, int(target_lengths.max()))
    targets = labels.gather(1, order)[:, :width].masked_fill(~keep.gather(1, order)[:, :width], blank)
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        nll = torch.nn.functional.ctc_loss(log_probs, _to_device(targets, logits.device), frame_lengths,
                                           target_lengths, blank=blank, reduction="none", zero_infinity=zero_infinity)
    if reduction in ("none", "sum"):
        return nll.sum() if reduction == "sum" else nll
    # divided here: F.ctc_loss would divide by the lengths where they are, on the CPU
    per_token = nll / _to_device(target_lengths.clamp(min=1), nll.device)
    return per_token.mean() if reduction == "mean" else per_token


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to ``device`` without waiting for it (pinned first, so the copy is asynchronous)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
