"""w2v-BERT 2.0 (wav2vec2-bert): conformer layers over 80-dim log-mel fbank frames (10 ms hop), stacked
in pairs to 160 dims (50 Hz), with an optional convolutional adapter (stride 2: 25 Hz CTC frames).

  16 kHz audio ──stacked_fbank (loader workers)──> input_features (F, 160), F = (1 + (T - 400) // 160) // 2
  ──feature projection──> conformer layers (half FFN, relative-key attention, depthwise conv, half FFN)
  ──adapter (add_adapter: strided conv + attention per layer)──> CTC head

There is no convolutional feature encoder (nothing to freeze) and no positional convolution; the
published facebook/w2v-bert-2.0 is a base checkpoint without a CTC head. transformers' own forward
trains it (the sync-free forward implements the wav2vec2 layout only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import transformers

from ..audio import SAMPLE_RATE
from ..config import ModelArgs
from ..errors import UserError
from . import ModelError, ModelFamily, register

log = logging.getLogger(__name__)

# SeamlessM4TFeatureExtractor's framing: 25 ms windows every 10 ms, pairs of frames stacked
WINDOW, HOP, STACK = 400, 160, 2


def relative_key_bias(module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w2v-BERT's relative-key attention bias, (B, H, L, R): each query's dot product with the distance
    embedding of its distance to each key (clamped to [-left, right]), times the attention's scaling.

    transformers computes it as einsum("bhld,lrd->bhlr", query, E[distance]): an (L, R, D) tensor of the
    embeddings of every pair, and a product as large as the attention scores themselves (2·B·H·L·R·D FLOPs),
    with as large a backward. A distance takes one of K = left + right + 1 values (73 in w2v-BERT 2.0), so
    here each query meets the K embeddings once (B, H, L, K) and the bias gathers from that: the same
    numbers within float rounding (each one the same D-term dot product), K/R of the product (at 15 s, 73 against 750 keys),
    and no (L, R, D) tensor. Installed in place of transformers' by the family (``use_relative_key_bias``)."""
    left, right = module.left_max_position_embeddings, module.right_max_position_embeddings
    # through the embedding's forward, not its weight: ZeRO-3 gathers a parameter in its owner's forward
    table = module.distance_embedding(torch.arange(left + right + 1, device=query.device)).to(query.dtype)
    per_distance = torch.matmul(query, table.t())  # (B, H, L, K)
    rows = torch.arange(query.shape[2], device=query.device).view(-1, 1)
    cols = torch.arange(key.shape[2], device=query.device).view(1, -1)
    index = (torch.clamp(cols - rows, -left, right) + left).expand(*query.shape[:2], -1, -1)  # (B, H, L, R)
    return query, torch.gather(per_distance, 3, index) * module.scaling


def use_relative_key_bias() -> None:
    """Compute w2v-BERT's relative-key bias with ``relative_key_bias`` (the same values, a tenth of the work at
    15 s) in every wav2vec2-bert model of this process; a transformers without the function it replaces is
    left as it is."""
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as m

    global transformers_relative_key_bias
    own = getattr(m, "_apply_relative_key_position_encoding", None)
    if own is not None and own is not relative_key_bias:
        transformers_relative_key_bias = own
        m._apply_relative_key_position_encoding = relative_key_bias


transformers_relative_key_bias = None  # what use_relative_key_bias replaced (the tests compare with it)


class FeatureError(UserError):
    """Audio the featuriser cannot turn into w2v-BERT's input."""


_extractor = None


def stacked_fbank(audio: np.ndarray) -> np.ndarray:
    """w2v-BERT's input for 1-D float32 16 kHz audio (T,): (F, 160) float32, computed by transformers'
    SeamlessM4TFeatureExtractor (Kaldi-style log-mel fbank, normalised per mel bin over the utterance,
    pairs of frames stacked). Its ``input_features`` restricted to its attention mask: for an odd count
    of fbank frames it adds a stacked frame whose second half is padding and masks it out; that frame
    is left out here, so the frames the model sees are the ones the pipeline lets it see."""
    global _extractor
    if len(audio) < WINDOW + HOP:  # two fbank frames: the per-bin variance of one is undefined
        raise FeatureError(f"an utterance of {len(audio)} samples ({1000 * len(audio) / SAMPLE_RATE:.0f} ms): "
                           f"w2v-BERT's features need at least {WINDOW + HOP} "
                           f"({1000 * (WINDOW + HOP) // SAMPLE_RATE} ms); "
                           f"rebuild the shards with a higher --min-duration")
    if _extractor is None:  # one per process (each loader worker makes its own)
        _extractor = transformers.SeamlessM4TFeatureExtractor()
    out = _extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")
    frames = int(out["attention_mask"][0].sum())
    return np.ascontiguousarray(out["input_features"][0, :frames], dtype=np.float32)


stacked_fbank.samples_per_frame = STACK * HOP  # audio samples per input frame (data.pad_to_multiple_of in frames)


def fbank_frames(num_samples):
    """Stacked fbank frames of ``num_samples`` samples (an int or a tensor of them), as stacked_fbank makes."""
    if isinstance(num_samples, torch.Tensor):
        return ((num_samples - WINDOW) // HOP + 1).clamp(min=0) // STACK
    return max(0, (num_samples - WINDOW) // HOP + 1) // STACK


@register
class Wav2Vec2BertFamily(ModelFamily):
    name = "wav2vec2-bert"
    model_types = ("wav2vec2-bert",)
    config_class = transformers.Wav2Vec2BertConfig
    ctc_class = transformers.Wav2Vec2BertForCTC
    base_attr = "wav2vec2_bert"
    input_name = "input_features"
    has_front_end = False
    conv_adapter = True
    attention_kernels = ("sdpa", "eager")  # no flash attention in transformers' wav2vec2-bert
    recompiles_per_length = True
    _layout = dict(feature_projection_input_dim=STACK * 80, position_embeddings_type="relative_key",
                   hidden_act="swish")
    presets = {
        # for CPUs: a short depthwise kernel, the rest as small as the other families' tiny
        "tiny": dict(_layout, hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                     conv_depthwise_kernel_size=15),
        # facebook/w2v-bert-2.0's layout (transformers' Wav2Vec2BertConfig defaults): about 580 M parameters
        "600m": dict(_layout, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     conv_depthwise_kernel_size=31, left_max_position_embeddings=64, right_max_position_embeddings=8),
    }

    # ── build ──

    def build(self, args: ModelArgs, vocab: dict[str, int], config=None):
        use_relative_key_bias()
        return super().build(args, vocab, config)

    def overrides(self, args: ModelArgs, vocab: dict[str, int]) -> dict:
        known = self.config_class().to_dict()
        values = {k: v for k, v in super().overrides(args, vocab).items() if k in known}
        if args.add_adapter is not None:
            values["add_adapter"] = args.add_adapter
        return values

    def new_weight(self, key: str, args: ModelArgs) -> bool:
        # model.add_adapter=true on a checkpoint without one: the adapter starts random, as the head does
        # (Hugging Face's w2v-BERT 2.0 fine-tuning recipe); with one, its weights must be there
        return super().new_weight(key, args) or (key.startswith(f"{self.base_attr}.adapter.") and bool(args.add_adapter)
                                                 and not _checkpoint_config(args.pretrained).get("add_adapter", False))

    def check(self, args: ModelArgs, zero_stage: int) -> None:
        super().check(args, zero_stage)
        config = {**self.config_class().to_dict(),
                  **(_checkpoint_config(args.pretrained) if args.pretrained else self.presets.get(args.preset, {}))}
        adapter = config["add_adapter"] if args.add_adapter is None else args.add_adapter
        kernel, stride = config["adapter_kernel_size"], config["adapter_stride"]
        if adapter and kernel // 2 != stride // 2:
            raise ModelError(f"{args.pretrained or args.preset}: a wav2vec2-bert adapter of adapter_kernel_size={kernel} "
                             f"with adapter_stride={stride}: transformers' adapter pads {stride // 2} frames but counts "
                             f"its CTC frames with {kernel // 2} of padding, so its logits and its CTC loss disagree; "
                             f"asr-dist trains adapters whose kernel // 2 equals stride // 2 (w2v-BERT's: 3 and 2)")
        if adapter and args.layerdrop > 0:
            # transformers' adapter draws LayerDrop for its own strided layers, without the ZeRO-3 guard the
            # encoder has; a skipped one leaves the time axis at twice the frames the CTC lengths count
            raise ModelError(f"model.layerdrop={args.layerdrop} with the wav2vec2-bert adapter (add_adapter): "
                             f"transformers' adapter would skip its strided layers too, and a skipped one leaves "
                             f"the logits at twice the frames the CTC loss counts. Set model.layerdrop=0, or "
                             f"model.add_adapter=false")

    # ── the input and its frames ──

    def featurizer(self):
        return stacked_fbank

    def output_frames(self, config, num_frames):
        """CTC frames for ``num_frames`` input-feature frames (an int or a tensor): the adapter's strided
        convolutions (padding kernel // 2), as transformers' ``_get_feat_extract_output_lengths``."""
        n = num_frames
        for _ in range(config.num_adapter_layers if config.add_adapter else 0):
            n = _adapter_frames(config, n)
        return n

    def audio_frames(self, config, num_samples):
        frames = self.output_frames(config, fbank_frames(num_samples))
        return frames.clamp(min=0) if isinstance(frames, torch.Tensor) else max(0, int(frames))

    def zero3_external_parameters(self, model) -> list[torch.nn.Parameter]:
        # transformers' forward, the only one here, uses masked_spec_embed inside its owner's forward,
        # where ZeRO-3 gathers it anyway
        return []

    # ── FLOPs ──

    def forward_flops(self, config, num_samples: int, layers: float | None = None) -> tuple[float, float]:
        """(0: no feature encoder, the rest) forward FLOPs for one utterance of ``num_samples``: the fbank
        (on the loader's CPUs) is not counted; the feature projection, the conformer layers, the adapter
        and the CTC head are."""
        frames = max(1, fbank_frames(num_samples))
        h, f = config.hidden_size, config.intermediate_size
        rest = 2.0 * frames * config.feature_projection_input_dim * h
        rest += (self.num_layers(config) if layers is None else layers) * self.layer_flops(config, frames)
        out = h
        if config.add_adapter:
            if config.use_intermediate_ffn_before_adapter:
                rest += 2.0 * frames * 2 * h * f
            out = config.output_hidden_size
            if out != h:
                rest += 2.0 * frames * h * out
            k = config.adapter_kernel_size
            for _ in range(config.num_adapter_layers):
                frames = _adapter_frames(config, frames)
                rest += 2 * 2.0 * frames * k * out * 2 * out  # residual and attention pooling convs (to 2x for the GLU)
                rest += 2.0 * frames * 4 * out * out + 4.0 * frames * frames * out  # attention
                rest += 2.0 * frames * 2 * out * f  # feed-forward
        rest += 2.0 * frames * out * config.vocab_size  # CTC head
        return 0.0, rest

    def positional_flops(self, config, frames: int) -> float:
        return 0.0  # positions enter in the attention (layer_flops)

    def layer_flops(self, config, frames: int) -> float:
        """One conformer layer: two half-step feed-forward blocks, self-attention (with its relative-key
        position scores), the convolution module (pointwise to 2h for the GLU, depthwise, pointwise)."""
        h, f, k = config.hidden_size, config.intermediate_size, config.conv_depthwise_kernel_size
        ffn = 2 * 2.0 * frames * 2 * h * f
        attention = 2.0 * frames * 4 * h * h + 4.0 * frames * frames * h
        if config.position_embeddings_type == "relative_key":  # query x each distance's embedding (relative_key_bias)
            attention += 2.0 * frames * (config.left_max_position_embeddings + config.right_max_position_embeddings + 1) * h
        elif config.position_embeddings_type == "relative":  # projected positions and their scores
            attention += 2.0 * (2 * frames) * h * h + 2.0 * frames * frames * h
        conv = 2.0 * frames * h * (2 * h + k + h)
        return ffn + attention + conv

    # ── export ──

    def feature_extractor(self):
        return transformers.SeamlessM4TFeatureExtractor()

    def processor(self, vocab_path: Path):
        return transformers.Wav2Vec2BertProcessor(feature_extractor=self.feature_extractor(),
                                                  tokenizer=self.tokenizer(vocab_path))


def _adapter_frames(config, n):
    """Frames after one adapter layer: a convolution of adapter_kernel_size, padding kernel // 2."""
    kernel = config.adapter_kernel_size
    return (n + 2 * (kernel // 2) - kernel) // config.adapter_stride + 1


def _checkpoint_config(pretrained: str | None) -> dict:
    if not pretrained:
        return {}
    return json.loads(Path(pretrained, "config.json").read_text())
