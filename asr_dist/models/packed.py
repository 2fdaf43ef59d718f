"""The packed training forward of the wav2vec2 layout: a micro-batch's utterances end to end in one sequence,
each attending only to its own frames; each utterance's logits and CTC loss are those of the same micro-batch
padded within floating-point tolerance (for wav2vec2 and HuBERT also those of the utterance alone; data2vec-
audio's stacked positional convolutions let padding reach its frames, padded as packed).

  input_values (1, S) packed (asr_dist.data.packing: utterance i at starts[i], a multiple of the stride 320)
  ──feature encoder──> (1, P, C) frames; utterance i owns frames starts[i] / 320 + [0, F_i), where F_i is
                       its frames alone: the convolutions have no padding and every start is on the frame
                       grid, so these frames see exactly its samples; a frame straddling two utterances
                       belongs to none ("gap": segment -1)
  ──feature projection (per frame)──> (1, P, H)
  ──SpecAugment──> masks drawn for (B, F_max) as the padded forward draws them (same generator, same order),
                   placed on each utterance's frames
  ──positional convolution (kernel 128: it would reach into a neighbour)──> run per utterance on the padded
                   layout (B, F_max, H), gathered from and added back to the packed frames
  ──transformer layers──> attention within an utterance only. sdpa: queries, keys and values gathered per
                   utterance into the padded layout (B, heads, F_max, d), attended with the padding mask
                   and put back (``utterance_sdpa``: the cost of a padded batch's attention, not the
                   packed sequence's square); eager and flex: transformers' mask for the kernel with a
                   document mask (segment[q] == segment[kv]; flex skips the blocks it masks)
  ──CTC head (per frame)──> logits gathered per utterance (B, F_max, V) ──> the CTC loss of the padded forward

Group-norm feature encoders (wav2vec2-base, HuBERT-base) normalise each channel over the whole sequence,
neighbours included: they are refused (``packing_refusal``), as is a strided adapter after the encoder.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from transformers import AttentionInterface
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from .ctc import check_label_ids, ctc_loss, run_layers, to_device


UTTERANCE_SDPA = "asr_dist_utterance_sdpa"  # the attention function the layers call for packed batches under sdpa


@dataclasses.dataclass
class UtteranceAttention:
    """What the layers get as their attention mask in a packed micro-batch under sdpa: where each utterance's
    frames lie in the packed sequence (device tensors, made from host indices)."""

    index: torch.Tensor  # (B, F_max): the packed frame of utterance i's frame j (0 past its end)
    key_mask: torch.Tensor  # (B, 1, 1, F_max) bool: its real frames
    rows: torch.Tensor  # the real (i, j), flattened to i * F_max + j
    targets: torch.Tensor  # their packed frames
    num_frames: int  # P


def utterance_sdpa(module, query, key, value, attention_mask: UtteranceAttention, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs):
    """PyTorch's SDPA per utterance of a packed sequence: (1, heads, P, d) gathered into (B, heads, F_max, d),
    attended with the padding mask, and put back as (1, P, heads, d), as transformers' attention functions
    return it (frames of no utterance get zeros)."""
    a = attention_mask

    def per_utterance(x: torch.Tensor) -> torch.Tensor:
        return x[0][:, a.index].transpose(0, 1)

    out = torch.nn.functional.scaled_dot_product_attention(per_utterance(query), per_utterance(key),
                                                           per_utterance(value), attn_mask=a.key_mask,
                                                           dropout_p=dropout, scale=scaling)
    b, h, f, d = out.shape
    real = out.transpose(1, 2).reshape(b * f, h, d).index_select(0, a.rows)
    return out.new_zeros(a.num_frames, h, d).index_copy(0, a.targets, real)[None], None


AttentionInterface.register(UTTERANCE_SDPA, utterance_sdpa)


def frame_stride(config) -> int:
    """Input samples per CTC frame of the wav2vec2 layout: the product of its convolutions' strides."""
    return math.prod(int(s) for s in config.conv_stride)


def packing_refusal(config) -> str | None:
    """Why a model of ``config`` cannot run packed, or None."""
    if getattr(config, "feat_extract_norm", "layer") != "layer":
        return ("its feature encoder normalises with a group norm over the whole sequence "
                "(feat_extract_norm=group, as wav2vec2-base and HuBERT-base), which would mix the packed "
                "utterances")
    if getattr(config, "add_adapter", False):
        return "its adapter after the encoder (add_adapter) strides over neighbouring frames"
    return None


def segments(frame_offsets: torch.Tensor, frame_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(num_frames,) int64: the utterance each packed frame belongs to, -1 for a frame of none."""
    seg = torch.full((num_frames,), -1, dtype=torch.int64)
    for i, (o, n) in enumerate(zip(frame_offsets.tolist(), frame_lengths.tolist())):
        seg[o:o + n] = i
    return seg


def packed_forward(model, w2v, input_values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                   labels: torch.Tensor | None = None, skip_layers: list[bool] | None = None, *,
                   time_masks_over_padding: bool = False) -> CausalLMOutput:
    """The *ForCTC forward and CTC loss of a packed micro-batch (see the module's docstring). ``starts`` and
    ``lengths`` (samples, on the host) place each utterance; SpecAugment's masks are drawn over the longest
    utterance's frames, as for the padded micro-batch (without data.pad_to_multiple_of). Returns the loss and
    the logits per utterance, (B, F_max, V), as the padded forward's (its padded frames are not defined here)."""
    cfg = model.config
    enc, device = w2v.encoder, input_values.device
    stable = getattr(cfg, "do_stable_layer_norm", False)
    stride = frame_stride(cfg)
    batch = len(lengths)
    frame_lengths = model._get_feat_extract_output_lengths(lengths.cpu()).long()
    frame_offsets = starts.cpu() // stride
    num_frames = int(model._get_feat_extract_output_lengths(input_values.shape[1]))
    longest = frames = int(frame_lengths.max())
    seg = segments(frame_offsets, frame_lengths, num_frames)  # host
    frame_mask = torch.arange(longest) < frame_lengths[:, None]  # (B, F_max), host
    index = (frame_offsets[:, None] + torch.arange(longest)).masked_fill(~frame_mask, 0)  # packed frame of (i, j)
    check_label_ids(labels, cfg.vocab_size)

    hidden = w2v.feature_projection(w2v.feature_extractor(input_values).transpose(1, 2))
    if isinstance(hidden, tuple):
        hidden = hidden[0]
    hidden = hidden[0]  # (P, H)
    time_mask = feature_mask = None
    if model.training and getattr(cfg, "apply_spec_augment", True):
        if cfg.mask_time_prob > 0:
            drawn = torch.from_numpy(_compute_mask_indices(
                (batch, frames), mask_prob=cfg.mask_time_prob, mask_length=cfg.mask_time_length,
                attention_mask=None if time_masks_over_padding else torch.arange(frames) < frame_lengths[:, None],
                min_masks=cfg.mask_time_min_masks))[:, :longest] & frame_mask
            time_mask = torch.zeros(num_frames, dtype=torch.bool)
            time_mask[index[drawn]] = True
        if cfg.mask_feature_prob > 0:
            per_utterance = torch.from_numpy(_compute_mask_indices(
                (batch, cfg.hidden_size), mask_prob=cfg.mask_feature_prob, mask_length=cfg.mask_feature_length,
                min_masks=cfg.mask_feature_min_masks))
            feature_mask = per_utterance[seg.clamp(min=0)] & (seg >= 0)[:, None]  # (P, H)
    valid = to_device(seg >= 0, device)
    if time_mask is not None:
        hidden = torch.where(to_device(time_mask, device)[:, None], w2v.masked_spec_embed.to(hidden.dtype), hidden)
    if feature_mask is not None:
        hidden = hidden.masked_fill(to_device(feature_mask, device), 0)
    hidden = hidden.masked_fill(~valid[:, None], 0)
    # the positional convolution per utterance, on the padded layout (zeros beyond each one's frames); the
    # indices are made on the host, so no boolean index waits for the GPU
    index_d, mask_d = to_device(index, device), to_device(frame_mask, device)
    padded = hidden[index_d].masked_fill(~mask_d[..., None], 0)  # (B, F_max, H)
    positional = enc.pos_conv_embed(padded)
    rows = torch.nonzero(frame_mask.reshape(-1)).squeeze(1)  # host: the (i, j) of real frames, flattened
    rows_d, targets_d = to_device(rows, device), to_device(index.reshape(-1)[rows], device)
    hidden = hidden.index_add(0, targets_d, positional.reshape(-1, positional.shape[-1]).index_select(0, rows_d))
    hidden = hidden[None]  # (1, P, H)
    hidden = enc.dropout(hidden if stable else enc.layer_norm(hidden))
    kernel = cfg._attn_implementation
    if kernel == "sdpa":  # attention per utterance, on the padded layout (utterance_sdpa)
        attention = UtteranceAttention(index_d, mask_d[:, None, None, :], rows_d, targets_d, num_frames)
        cfg._attn_implementation = UTTERANCE_SDPA
    else:
        attention = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=None,
                                              and_mask_function=packed_sequence_mask_function(to_device(seg[None], device)),
                                              allow_is_bidirectional_skip=False)
    try:
        hidden = run_layers(enc.layers, hidden, attention, model.training, cfg.layerdrop, skip_layers)
    finally:
        cfg._attn_implementation = kernel
    if stable:
        hidden = enc.layer_norm(hidden)
    logits = model.lm_head(model.dropout(hidden))[0][index_d]  # (B, F_max, V)
    loss = None
    if labels is not None:
        loss = ctc_loss(logits, labels.cpu(), frame_lengths, cfg.pad_token_id, cfg.ctc_loss_reduction,
                        cfg.ctc_zero_infinity)
    return CausalLMOutput(loss=loss, logits=logits)
