"""MMS adapter-only fine-tuning (model.train_adapters_only): from an MMS-like checkpoint, a base checkpoint
or a preset only the adapters and the CTC head train; what cannot work is refused when the config is
read; the adapter file is what transformers' load_adapter reads. (The sync-free forward with adapters:
test_forward.py.)"""

from __future__ import annotations

import pytest
import torch
import transformers

from asr_dist.config import ModelArgs
from asr_dist.models import FAMILIES, ModelError, build_model
from asr_dist.plan import load_run_config
from trainkit import save_base_model

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}
BASE = ["output_dir=x", "data.train_shards=[x]", "train.max_steps=1"]


def _mms_checkpoint(out, adapter_attn_dim=8):
    """A random tiny wav2vec2 CTC model with attention adapters in every layer, saved as mms-1b-all is
    published (adapters and a head for another vocabulary, here of 20 ids)."""
    torch.manual_seed(7)
    config = transformers.Wav2Vec2Config(**FAMILIES["wav2vec2"].presets["tiny"], adapter_attn_dim=adapter_attn_dim,
                                         vocab_size=20)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(str(out))
    return out


ADAPTERS = ["model.train_adapters_only=true", "model.adapter_language=dan"]


def test_adapter_only_training_trains_the_adapters_and_head_alone(tmp_path, caplog):
    """From an MMS-like checkpoint (its adapters drawn anew, its width kept), from a base checkpoint without
    adapters (new ones, MMS's width 16) and from a preset: only the adapters and the CTC head train, and
    every other weight is the checkpoint's."""
    mms = _mms_checkpoint(tmp_path / "mms")
    base = save_base_model("wav2vec2", tmp_path / "base")
    saved = transformers.Wav2Vec2ForCTC.from_pretrained(str(mms)).state_dict()
    for source, width in ((f"model.pretrained={mms}", 8), (f"model.pretrained={base}", 16), ("model.preset=tiny", 16)):
        cfg = load_run_config(None, BASE + [source, *ADAPTERS])
        with caplog.at_level("INFO", logger="asr_dist.models"):
            model, family = build_model(cfg.model, VOCAB)
        assert model.config.adapter_attn_dim == width
        adapters = family.adapter_weights(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(adapters) and {p for p in family.trainable_parameters(model)} == set(adapters.values())
        assert {n.split(".")[0] for n in trainable} == {"wav2vec2", "lm_head"}
        assert len([n for n in trainable if ".adapter_layer." in n]) == 4 * 6  # 4 layers x (norm, 2 linear) x (w, b)
        head = 2 * (192 * width) + width + 192 * 3  # per layer: two projections, their biases, the norm and its bias
        assert sum(p.numel() for p in adapters.values()) == 4 * head + 192 * len(VOCAB) + len(VOCAB)
        assert "trainable: adapters only (dan" in caplog.text
        caplog.clear()
        if source.endswith(str(mms)):
            state = model.state_dict()
            for k, v in saved.items():
                if k in adapters:  # drawn anew, as MMS's recipe does for a new language
                    assert k.startswith("lm_head") or k.endswith("bias") or k.endswith("norm.weight") or \
                        not torch.equal(v, state[k]), k
                else:
                    torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    # model.adapter_attn_dim overrides the checkpoint's width
    cfg = load_run_config(None, BASE + [f"model.pretrained={mms}", *ADAPTERS, "model.adapter_attn_dim=4"])
    assert build_model(cfg.model, VOCAB)[0].config.adapter_attn_dim == 4


def test_adapter_only_settings_that_cannot_work_are_refused_when_read(tmp_path):
    hubert = save_base_model("hubert", tmp_path / "hubert")
    cases = [
        ([f"model.pretrained={hubert}", *ADAPTERS], "hubert: transformers' HubertForCTC has no attention adapters"),
        (["model.preset=tiny", "model.family=wav2vec2-conformer", *ADAPTERS], "Wav2Vec2ConformerForCTC has no"),
        (["model.preset=base", *ADAPTERS], "model.preset=base has wav2vec2's post-norm layout"),
        (["model.preset=tiny", "model.train_adapters_only=true"], "needs model.adapter_language"),
        (["model.preset=tiny", "model.adapter_language=dan"], "model.train_adapters_only is false"),
        (["model.preset=tiny", "model.adapter_attn_dim=8"], "model.train_adapters_only is false"),
        (["model.preset=tiny", "model.train_adapters_only=true", "model.adapter_language=../x"], "part of a file name"),
        (["model.preset=tiny", *ADAPTERS, "model.adapter_attn_dim=0"], "give at least 1"),
        (["model.preset=tiny", *ADAPTERS, "model.freeze_feature_encoder=false"], "freezes the whole encoder"),
    ]
    for overrides, message in cases:
        with pytest.raises(ModelError, match=message):
            load_run_config(None, BASE + overrides)


def test_the_adapter_file_holds_what_load_adapter_reads(tmp_path):
    """adapter.<lang>.safetensors: exactly the adapter and head tensors; loaded by transformers' load_adapter
    into a model with other adapters, it gives the model's logits."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model, family = build_model(ModelArgs(preset="tiny", train_adapters_only=True, adapter_language="dan"), VOCAB)
    with torch.no_grad():
        for p in family.adapter_weights(model).values():
            p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(str(tmp_path))
    path = family.write_adapter(model.state_dict(), model, "dan", tmp_path)
    assert path.name == "adapter.dan.safetensors"
    assert set(load_file(str(path))) == set(model._get_adapters())
    x = torch.randn(1, 16000)
    expected = model.eval()(x).logits
    other = transformers.Wav2Vec2ForCTC.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        for p in other._get_adapters().values():
            p.normal_()
    assert not torch.allclose(other(x).logits, expected)
    other.load_adapter("dan")
    torch.testing.assert_close(other(x).logits, expected, rtol=0, atol=1e-6)
