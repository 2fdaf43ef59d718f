"""From-scratch layouts of the wav2vec2 encoder (Wav2Vec2Config arguments), shared by the families that
keep its layout (HuBERT, WavLM, the conformer). "tiny" keeps a small conv front end because it dominates CPU time."""

PRESETS = {
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                 conv_dim=(48,) * 7, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
                 feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 conv_dim=(512,) * 7, feat_extract_norm="group", do_stable_layer_norm=False),
    "xlsr-300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}
PRESETS["large"] = PRESETS["xlsr-300m"]  # wav2vec2-large-lv60's layout, which XLS-R-300M shares
