"""asr-dist: fine-tune wav2vec2 / XLS-R CTC speech recognisers at scale."""

__version__ = "0.1.0"
