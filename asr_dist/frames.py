"""CTC frames per input length, a model fact: how many output frames a model makes of N samples of 16 kHz
audio, and whether CTC can align an utterance's labels with them.

  num_samples ──each (kernel, stride) step: n -> (n - kernel) // stride + 1──> CTC frames F
  labels (L,) ──one frame a label, plus a blank between equal neighbours──> frames needed
  alignable when F >= frames needed

The model families give the steps of their layout (``ModelFamily.alignment_check``); the data layer only
calls the check it is handed. It lives outside asr_dist.models because the loader's workers unpickle the
check: importing anything under asr_dist.models imports transformers (about 7 s and 130 MB in each worker
as an epoch starts), and this module imports nothing.
"""

from __future__ import annotations


# wav2vec2's convolutional feature encoder: (kernel, stride) per layer; about 49.9 frames per second
WAV2VEC2_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def num_ctc_frames(num_samples: int, conv=WAV2VEC2_CONV) -> int:
    """Output frames of wav2vec2's feature encoder for ``num_samples`` 16 kHz samples (``conv``: another
    layout's (kernel, stride) steps, each ``n -> (n - kernel) // stride + 1``)."""
    n = num_samples
    for kernel, stride in conv:
        n = (n - kernel) // stride + 1
        if n <= 0:
            return 0
    return n


class AlignmentCheck:
    """Whether CTC can align an utterance with a model: its frames must hold one per label plus a blank
    between each pair of equal adjacent labels. An utterance that cannot be aligned has an infinite CTC
    loss, which ``ctc_zero_infinity`` turns into a zero loss and no gradient: it would train on nothing,
    silently. ``frames`` maps 16 kHz samples to the model's CTC frames; the model families give
    ``functools.partial(num_ctc_frames, conv=steps)``, which the loader's workers call without building a
    model. Pure Python and picklable."""

    def __init__(self, frames):
        self.frames = frames

    @staticmethod
    def frames_needed(labels) -> int:
        """Frames CTC needs for ``labels`` (ids, without padding)."""
        return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)

    def __call__(self, num_samples: int, labels) -> tuple[int, int]:
        """(the model's frames for ``num_samples``, the frames ``labels`` need): alignable when the first >= the second."""
        return self.frames(num_samples), self.frames_needed(labels)
