"""The crop geometry that training, evaluation and prediction share: real frames and crop starts.

Plain Python (no torch), so that the decoder processes of prediction can use it.
"""

from __future__ import annotations

from genreclf.audio import HOP_LENGTH
from genreclf.errors import GenreclfError

CROP_FRAMES = 256  # scoring crops: the longest training crop
N_CROPS = 8  # evenly spaced crops per 30-s window (or per track, in evaluation)


def valid_frames(n_samples: int, max_frames: int | None = None) -> int:
    """Return how many frames of a clip of `n_samples` real samples are centred on real audio."""
    frames = max(1, -(-n_samples // HOP_LENGTH))
    return frames if max_frames is None else min(frames, max_frames)


def crop_starts(n_frames: int, crop: int, n_crops: int) -> list[int]:
    """Return evenly spaced start frames of n_crops crops of length crop covering n_frames.

    The first crop starts at 0 and the last at n_frames - crop; one crop is the
    centre crop; a sequence no longer than crop gives [0] (the caller pads).
    Starts are rounded half up and deduplicated, so a short sequence can give
    fewer than n_crops crops (a repeated crop would count twice in an average).
    """
    if crop < 1 or n_crops < 1:
        raise GenreclfError(f"crop length and number of crops must be >= 1, got {crop} and {n_crops}")
    span = n_frames - crop
    if span <= 0:
        return [0]
    if n_crops == 1:
        return [span // 2]
    starts = [(2 * k * span + n_crops - 1) // (2 * (n_crops - 1)) for k in range(n_crops)]
    return sorted(set(starts))
