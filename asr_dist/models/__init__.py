"""The model seam: one ``ModelFamily`` per CTC encoder family owns everything that differs between them.

  model.pretrained/config.json "model_type" ──family_for──> ModelFamily   (or model.family + model.preset)
  ModelFamily.build(args, vocab) ──> transformers' *ForCTC (a base checkpoint gets a CTC head sized to vocab.json)
      .featurize      1-D float32 16 kHz audio ──> the model's input (run in the loader's workers)
      .output_frames  input samples (or feature frames) ──> CTC frames (the convolution layout, adapter strides)
      .audio_frames   samples of 16 kHz audio ──> CTC frames (through the featuriser's framing where it has one);
                      .alignment_check: can CTC align N samples with labels L
      .front_end      the feature encoder (frozen when asked; None where a family has none)
      .freeze_all_but_adapters  MMS adapter-only training (families whose *ForCTC has attention adapters)
      .use_sync_free_forward / zero3_external_parameters / compile / flops pieces / processor (export)

The engine, evaluation, decoding, export, loader and bench ask the family; they name no encoder class.
A checkpoint of a family that is not here is refused by its model_type, never loaded as another one.
Models know nothing of ranks or DeepSpeed (the engine wraps them).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError, ModelArgs
from ..audio import normalize
from ..text import PAD_TOKEN
from ..frames import AlignmentCheck, num_ctc_frames
from .batchnorm import use_fp32_batch_norm

log = logging.getLogger(__name__)


class ModelError(ConfigError):
    """A model directory or model setting asr-dist cannot train or load; the message says what to change."""


class ModelFamily:
    """One CTC encoder family of transformers. The defaults fit the wav2vec2-like families (a convolutional
    feature encoder over the raw waveform, then a transformer encoder); a family overrides what differs."""

    name: str = ""  # what model.family takes, and the model card's tag
    model_types: tuple[str, ...] = ()  # config.json "model_type" values this family loads
    config_class = None  # transformers' config class
    ctc_class = None  # transformers' *ForCTC class
    base_attr: str = ""  # the *ForCTC attribute holding the encoder (model.wav2vec2, model.hubert, …)
    input_name: str = "input_values"  # the forward's keyword for the model input
    presets: dict[str, dict] = {}  # from-scratch layouts: config_class arguments
    attention_kernels: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2", "flex_attention")  # transformers
    sync_free: bool = False  # whether sync_free_forward implements this family's training forward
    fft_positional_conv: bool = False  # whether the positional convolution can be computed with FFTs
    conv_adapter: bool = False  # whether model.add_adapter (a strided adapter after the encoder) applies

    # ── build ──

    def overrides(self, args: ModelArgs, vocab: dict[str, int]) -> dict:
        """Config values a run sets on any checkpoint or preset: the CTC head, the loss, regularisation."""
        return dict(
            vocab_size=len(vocab), pad_token_id=vocab[PAD_TOKEN], ctc_loss_reduction="mean", ctc_zero_infinity=True,
            layerdrop=args.layerdrop, mask_time_prob=args.mask_time_prob, mask_time_length=args.mask_time_length,
            mask_feature_prob=args.mask_feature_prob, mask_feature_length=args.mask_feature_length,
            hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
            activation_dropout=args.activation_dropout, feat_proj_dropout=args.feat_proj_dropout,
            final_dropout=args.final_dropout,
            **({"adapter_attn_dim": self.adapter_size(args)} if args.train_adapters_only else {}),
        )

    def attention(self, args: ModelArgs) -> str:
        return args.attention or ("sdpa" if "sdpa" in self.attention_kernels else self.attention_kernels[0])

    def preset_config(self, preset: str, **overrides):
        return self.config_class(**self.presets[preset], **overrides)

    def base_config(self, args: ModelArgs):
        """The transformers config of model.pretrained (its config.json) or of the preset, before a run's overrides."""
        if args.pretrained:
            return self.config_class.from_pretrained(args.pretrained, local_files_only=True)
        return self.preset_config(args.preset)

    def run_config(self, args: ModelArgs, vocab: dict[str, int]):
        """The transformers config the run's model will have: model.pretrained's or the preset's, with the
        run's overrides (model.add_adapter changes the frames, for one)."""
        overrides = self.overrides(args, vocab)
        if args.pretrained:
            return self.config_class.from_pretrained(args.pretrained, local_files_only=True, **overrides)
        return self.preset_config(args.preset, **overrides)

    def build(self, args: ModelArgs, vocab: dict[str, int], config=None):
        """The *ForCTC model of ``args`` (a local checkpoint, or a preset with random weights); ``config``: its
        ``run_config`` when the caller has it already (asr_dist.plan), so config.json is not read again."""
        overrides = {} if config is not None else self.overrides(args, vocab)
        if config is not None:
            config = copy.deepcopy(config)
        if args.pretrained:
            model, info = self.ctc_class.from_pretrained(args.pretrained, local_files_only=True, config=config,
                                                         ignore_mismatched_sizes=True, output_loading_info=True,
                                                         attn_implementation=self.attention(args), **overrides)
            # a base checkpoint (no CTC head) gets a new head; anything else left random means a wrong checkpoint
            missing = [k for k in info["missing_keys"] if not self.new_weight(k, args)]
            if missing:
                raise ModelError(f"model.pretrained={args.pretrained}: {len(missing)} weights of the {self.name} "
                                 f"encoder are not in the checkpoint (e.g. {', '.join(missing[:3])}); it is not a complete "
                                 f"{self.name} checkpoint")
            return model
        if config is None:
            config = self.preset_config(args.preset, **overrides)
        config._attn_implementation = self.attention(args)
        return self.ctc_class(config)

    def new_weight(self, key: str, args: ModelArgs) -> bool:
        """Whether ``key`` may be missing from model.pretrained and start random: the CTC head and
        SpecAugment's embedding (a base checkpoint has neither), and the attention adapters that adapter-only
        training draws anew."""
        return (key.startswith("lm_head.") or "masked_spec_embed" in key
                or (bool(args.train_adapters_only) and ".adapter_layer." in key))  # new adapters: initialised in build

    def check(self, args: ModelArgs, zero_stage: int) -> None:
        """Refuse, when the config is read, what this family cannot do (the reason in the message)."""
        if args.preset is not None and args.preset not in self.presets:
            raise ModelError(f"model.preset={args.preset!r} for the {self.name} family; choose one of "
                             f"{', '.join(self.presets)}")
        if args.attention is not None and args.attention not in self.attention_kernels:
            raise ModelError(f"model.attention={args.attention} for {self.name}: transformers implements its "
                             f"attention as {' or '.join(self.attention_kernels)} only; set model.attention to one of those")
        if args.freeze_feature_encoder and not self.has_front_end:
            raise ModelError(f"model.freeze_feature_encoder=true for {self.name}: it has no convolutional feature "
                             f"encoder to freeze (its input is {self.input_name}); set it to false or leave it out")
        if args.add_adapter is not None and not self.conv_adapter:
            raise ModelError(f"model.add_adapter={str(args.add_adapter).lower()} for {self.name}: the convolutional "
                             f"adapter is a wav2vec2-bert setting; leave it out")
        if args.fft_positional_conv and not self.fft_positional_conv:
            raise ModelError(f"model.fft_positional_conv=true for {self.name}: it has no single grouped positional "
                             f"convolution to compute with FFTs (wav2vec2, hubert and wavlm have); set it to false")
        if args.compile and self.recompiles_per_length:
            raise ModelError(f"model.compile=true for {self.name}: torch.compile builds new graphs for every new "
                             f"batch length in its layers (the sequence length is specialised in their backward), "
                             f"so compiling costs more than it saves; set model.compile=false")
        self.check_adapters(args)

    # Whether torch.compile of the layers specialises the sequence length (conformer layers: one more graph
    # at every new length, measured on the tiny presets at 1.0, 1.5 and 1.25 s with relative and rotary
    # positions); past dynamo's recompile limit such layers fall back to eager without a word.
    recompiles_per_length: bool = False

    def check_adapters(self, args: ModelArgs) -> None:
        """model.train_adapters_only and its companions: refused where transformers has no attention adapters."""
        if not args.train_adapters_only:
            for key in ("adapter_language", "adapter_attn_dim"):
                if getattr(args, key) is not None:
                    raise ModelError(f"model.{key} is set but model.train_adapters_only is false: it only applies to "
                                     f"adapter-only training; set model.train_adapters_only=true or leave it out")
            return
        if not self.attn_adapters:
            raise ModelError(f"model.train_adapters_only=true for {self.name}: transformers' {self.ctc_class.__name__} "
                             f"has no attention adapters (MMS's are in wav2vec2 only); use a wav2vec2 checkpoint "
                             f"(XLS-R, MMS) or set it to false")
        if not args.adapter_language:
            raise ModelError("model.train_adapters_only=true needs model.adapter_language: the language code the "
                             "adapter is for (e.g. dan), which names the exported adapter.<language>.safetensors")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", args.adapter_language):
            raise ModelError(f"model.adapter_language={args.adapter_language!r}: give a code of letters, digits, _ and - "
                             f"(e.g. dan, or MMS's cmn-script_simplified): it becomes part of a file name")
        if args.adapter_attn_dim is not None and args.adapter_attn_dim < 1:
            raise ModelError(f"model.adapter_attn_dim={args.adapter_attn_dim}: give at least 1 (MMS's is 16)")
        if args.freeze_feature_encoder is False:
            raise ModelError("model.freeze_feature_encoder=false with model.train_adapters_only=true: adapter-only "
                             "training freezes the whole encoder, the feature encoder too; leave it out")
        config = self.base_config(args)
        if not getattr(config, "do_stable_layer_norm", False):
            where = f"model.pretrained={args.pretrained}" if args.pretrained else f"model.preset={args.preset}"
            raise ModelError(f"model.train_adapters_only=true: {where} has wav2vec2's post-norm layout "
                             f"(do_stable_layer_norm=false, as wav2vec2-base), whose layers transformers builds "
                             f"without attention adapters; use a pre-norm checkpoint (XLS-R, MMS, wav2vec2-large-lv60)")

    @property
    def attn_adapters(self) -> bool:
        """Whether transformers' *ForCTC of this family has MMS's attention adapters (``init_adapter_layers``)."""
        return hasattr(self.ctc_class, "init_adapter_layers")

    def adapter_size(self, args: ModelArgs) -> int:
        """The adapters' bottleneck: model.adapter_attn_dim, else the checkpoint's, else MMS's 16."""
        return args.adapter_attn_dim or getattr(self.base_config(args), "adapter_attn_dim", None) or 16

    # ── what the parts are ──

    has_front_end: bool = True

    def base(self, model):
        return getattr(model, self.base_attr)

    def front_end(self, model) -> torch.nn.Module | None:
        """The convolutional feature encoder, or None where the family has none."""
        return self.base(model).feature_extractor if self.has_front_end else None

    def freeze_front_end(self, model) -> None:
        front = self.front_end(model)
        if front is None:
            raise ModelError(f"{self.name} has no convolutional feature encoder to freeze")
        front._freeze_parameters()

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def adapter_weights(self, model) -> dict[str, torch.nn.Parameter]:
        """The attention adapters of every layer and the CTC head, by state_dict name: what adapter-only
        training trains and what ``load_adapter`` reads from adapter.<language>.safetensors."""
        return model._get_adapters()

    def freeze_all_but_adapters(self, model) -> None:
        """MMS's adapter-only recipe: the adapters and the CTC head (re)initialised, everything else frozen.
        A checkpoint's own adapters (mms-1b-all's are English) are drawn anew, as Hugging Face's MMS recipe
        means ``init_adapter_layers`` to. That method leaves them as they are in transformers 5 (measured):
        it hands each adapter layer to ``_init_weights``, which initialises only the leaf module it is given,
        and loaded weights are marked initialised, which its initialisers respect. So each leaf module of
        the adapters and the head is initialised here, with the mark taken off first."""
        owners = {name.rpartition(".")[0] for name in self.adapter_weights(model)}
        for name in sorted(owners):
            module = model.get_submodule(name)
            for p in module.parameters(recurse=False):
                p._is_hf_initialized = False
            module._is_hf_initialized = False
            model._init_weights(module)
        model.freeze_base_model()
        for p in self.adapter_weights(model).values():
            p.requires_grad = True

    def write_adapter(self, state: dict[str, torch.Tensor], model, language: str, directory: Path) -> Path:
        """adapter.<language>.safetensors in ``directory``: exactly the adapter tensors of ``state`` (a full
        state_dict), as transformers' ``load_adapter(language)`` reads them."""
        from safetensors.torch import save_file
        from transformers.models.wav2vec2.modeling_wav2vec2 import WAV2VEC2_ADAPTER_SAFE_FILE

        path = Path(directory) / WAV2VEC2_ADAPTER_SAFE_FILE.format(language)
        save_file({k: state[k].detach().to("cpu", torch.float32).contiguous() for k in self.adapter_weights(model)},
                  str(path), metadata={"format": "pt"})
        return path

    def num_layers(self, config) -> int:
        return config.num_hidden_layers

    def zero3_external_parameters(self, model) -> list[torch.nn.Parameter]:
        """Parameters the sync-free forward uses outside their owner's forward, which ZeRO-3 must gather
        there: SpecAugment's embedding (transformers' forward uses it inside its owner's)."""
        base = self.base(model)
        return [base.masked_spec_embed] if hasattr(base, "masked_spec_embed") else []

    # ── the input and its frames ──

    def featurizer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable function the loader's workers apply to each utterance (1-D float32, 16 kHz)."""
        return normalize

    def output_frames(self, config, num_samples):
        """CTC frames for ``num_samples`` input samples (an int or a tensor of them): each convolution of
        the feature encoder, then each strided adapter layer (``frame_steps``)."""
        n = num_samples
        for kernel, stride in self.frame_steps(config):
            n = (n - kernel) // stride + 1
        return n

    def audio_frames(self, config, num_samples):
        """CTC frames of ``num_samples`` samples of 16 kHz audio (an int or a tensor of them; 0 for audio too
        short for one frame)."""
        frames = self.output_frames(config, num_samples)
        return frames.clamp(min=0) if isinstance(frames, torch.Tensor) else max(0, int(frames))

    def frame_steps(self, config) -> tuple[tuple[int, int], ...] | None:
        """``audio_frames`` as (kernel, stride) steps, each ``n -> (n - kernel) // stride + 1``: each convolution
        of the feature encoder, then each strided adapter layer (kernel = stride, padding stride // 2, so
        (1, stride)); None where a family's frames are not such steps."""
        if not hasattr(config, "conv_kernel"):
            return None
        steps = tuple(zip(config.conv_kernel, config.conv_stride))
        if getattr(config, "add_adapter", False):
            steps += ((1, config.adapter_stride),) * config.num_adapter_layers
        return steps

    def alignment_check(self, config) -> AlignmentCheck:
        """A picklable check, for the loader's workers, of whether CTC can align an utterance with this model:
        ``frame_steps`` as plain Python (the workers then need not import transformers) where they give
        ``audio_frames``; ``audio_frames`` itself otherwise."""
        steps = self.frame_steps(config)
        if steps is not None:
            frames = functools.partial(num_ctc_frames, conv=tuple(tuple(map(int, s)) for s in steps))
            if all(frames(n) == self.audio_frames(config, n) for n in (1, 400, 16000, 16001, 123457, 480000)):
                return AlignmentCheck(frames)
        return AlignmentCheck(functools.partial(self.audio_frames, config))

    # ── the training forward and kernels ──

    def packing_refusal(self, config) -> str | None:
        """Why a model of ``config`` cannot train on packed micro-batches (data.pack), or None."""
        return (f"{self.name} has no packed forward: layers that look at neighbouring frames (a convolution "
                f"module, relative positions) would mix the packed utterances")

    def frame_stride(self, config) -> int:
        """Input samples per CTC frame: packed utterances start on multiples of it."""
        raise ModelError(f"{self.name}: no packed forward")

    def use_sync_free_forward(self, model) -> bool:
        """Install the sync-free training forward; False where it does not implement this model."""
        log.info("model.sync_free_forward: not implemented for %s; transformers' forward is used", self.name)
        return False

    def use_fft_positional_conv(self, model) -> None:
        raise ModelError(f"{self.name}: no FFT positional convolution")

    def compile(self, model) -> None:
        """``torch.compile`` every transformer layer in place (regional, dynamic length; see wav2vec2's)."""
        layers = self.base(model).encoder.layers
        for layer in layers:
            layer.compile(dynamic=True)
        log.info("torch.compile: %d transformer layers (one shared graph, dynamic length)", len(layers))

    # ── FLOPs (asr_dist.flops adds them up) ──

    def forward_flops(self, config, num_samples: int, layers: float | None = None) -> tuple[float, float]:
        """(feature encoder, everything after it) forward FLOPs for one utterance of ``num_samples``, with
        ``layers`` transformer layers run (all of them by default; fewer with LayerDrop, a mean is fine)."""
        frames, channels, encoder = num_samples, 1, 0.0
        for dim, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
            frames = (frames - kernel) // stride + 1
            encoder += 2.0 * frames * kernel * channels * dim
            channels = dim
        frames = max(frames, 1)
        h = config.hidden_size
        rest = 2.0 * frames * channels * h  # feature projection
        rest += self.positional_flops(config, frames)
        rest += (self.num_layers(config) if layers is None else layers) * self.layer_flops(config, frames)
        rest += 2.0 * frames * h * config.vocab_size  # CTC head
        return encoder, rest

    def positional_flops(self, config, frames: int) -> float:
        """Forward FLOPs of the positional convolution over ``frames``."""
        h = config.hidden_size
        return 2.0 * frames * config.num_conv_pos_embeddings * h * h / config.num_conv_pos_embedding_groups

    def layer_flops(self, config, frames: int) -> float:
        """Forward FLOPs of one transformer layer: projections, feed-forward, attention scores and mix."""
        h, f = config.hidden_size, config.intermediate_size
        return 2.0 * frames * (4 * h * h + 2 * h * f) + 4.0 * frames * frames * h

    # ── export ──

    def processor(self, vocab_path: Path):
        """The processor written with the model: what transformers' ASR pipeline loads with it."""
        import transformers

        return transformers.Wav2Vec2Processor(feature_extractor=self.feature_extractor(),
                                              tokenizer=self.tokenizer(vocab_path))

    def feature_extractor(self):
        """transformers' feature extractor that computes what ``featurizer`` computes (at export, in the pipeline)."""
        import transformers

        from ..audio import SAMPLE_RATE

        return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                     do_normalize=True, return_attention_mask=True)

    def tokenizer(self, vocab_path: Path):
        import transformers

        from ..text import UNK_TOKEN, WORD_DELIMITER

        return transformers.Wav2Vec2CTCTokenizer(str(vocab_path), unk_token=UNK_TOKEN, pad_token=PAD_TOKEN,
                                                 word_delimiter_token=WORD_DELIMITER)


FAMILIES: dict[str, ModelFamily] = {}


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    FAMILIES[cls.name] = cls()
    return cls


def _supported() -> str:
    return ", ".join(t for f in FAMILIES.values() for t in f.model_types)


def family_for(model_type_or_config) -> ModelFamily:
    """The family of a config.json ``model_type`` (or of a config or model directory); unknown: a ModelError."""
    source = ""
    if isinstance(model_type_or_config, (str, Path)) and Path(model_type_or_config, "config.json").is_file():
        source = f"{model_type_or_config}: "
        try:
            model_type = json.loads(Path(model_type_or_config, "config.json").read_text()).get("model_type")
        except ValueError as e:
            raise ModelError(f"{source}config.json is not valid JSON ({e})") from None
    elif isinstance(model_type_or_config, str):
        model_type = model_type_or_config
    else:
        model_type = getattr(model_type_or_config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ModelError(f"{source}model_type {model_type!r} is not a CTC encoder family asr-dist trains; supported: "
                     f"{_supported()}. A checkpoint is never loaded as another family")


def family_of(args: ModelArgs) -> ModelFamily:
    """The family ``args`` names: read from model.pretrained's config.json, else model.family (wav2vec2)."""
    if args.pretrained:
        family = family_for(args.pretrained)
        if args.family is not None and args.family != family.name:
            raise ModelError(f"model.family={args.family} but model.pretrained={args.pretrained} is a {family.name} "
                             f"checkpoint; leave model.family out (it is read from config.json)")
        return family
    name = args.family or "wav2vec2"
    if name not in FAMILIES:
        raise ModelError(f"model.family={name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


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


def build_model(args: ModelArgs, vocab: dict[str, int], seed: int = 0, family: ModelFamily | None = None,
                config=None):
    """``(model, family)``: the family's CTC model with its front end frozen (when asked), ready for DeepSpeed.
    ``family`` and ``config`` (its ``run_config``) where the caller resolved them already (asr_dist.plan)."""
    family = family or family_of(args)
    torch.manual_seed(seed)
    set_kernels(args)
    model = family.build(args, vocab, config)
    use_fp32_batch_norm(model)  # DeepSpeed's bf16/fp16 keeps the running statistics in fp32 (models.batchnorm)
    freeze = args.freeze_feature_encoder if args.freeze_feature_encoder is not None else bool(args.pretrained)
    if freeze and family.has_front_end:  # a pretrained front end is kept; a random one (a preset) has to learn
        family.freeze_front_end(model)
    if args.train_adapters_only:
        family.freeze_all_but_adapters(model)
    if args.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns); 5.17, on the GPU machines, has only the old one
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if args.fft_positional_conv:
        family.use_fft_positional_conv(model)
    trainable = sum(p.numel() for p in family.trainable_parameters(model))
    log.info("%s %s: %.1f M of %.1f M parameters trainable%s", type(model).__name__, args.pretrained or args.preset,
             trainable / 1e6, sum(p.numel() for p in model.parameters()) / 1e6,
             f": adapters only ({args.adapter_language}, width {model.config.adapter_attn_dim}) and the CTC head"
             if args.train_adapters_only else "")
    return model, family


def load_for_inference(model_dir: str | Path, device: torch.device):
    """``(model, family)`` of an exported model directory, in eval mode on ``device``."""
    family = family_for(model_dir)
    model = family.ctc_class.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    return model, family


# (they register)
from . import wav2vec2, hubert, wavlm, data2vec_audio, wav2vec2_conformer, wav2vec2_bert  # noqa: E402,F401
