"""Overlong reward shaping (DAPO section 3.4), on token counts.

Soft overlong punishment, with L_max = max_response_length and L_cache = buffer_length:

    R_length(y) = 0                                     |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                = -1                                    |y| > L_max

scaled by penalty_factor and added to the correctness reward. Overlong filtering instead drops
truncated answers from the loss (`overlong_filter_weights`). Lengths are token counts: a character
count (as some JAX frameworks use) would punish the wrong answers.
"""

from __future__ import annotations

import numpy as np


def _check(max_response_length: int, buffer_length: int, penalty_factor: float) -> None:
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"buffer_length={buffer_length} must be in (0, max_response_length={max_response_length}]; "
                         f"the paper uses 4096 of 20480")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor={penalty_factor} must be >= 0")


def overlong_penalty(length, *, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0):
    """R_length for a response of `length` tokens (an int, or an array of them): 0 inside the
    expected length, falling linearly to -penalty_factor at max_response_length."""
    _check(max_response_length, buffer_length, penalty_factor)
    lengths = np.asarray(length)
    if lengths.dtype.kind not in "iu" or np.any(lengths < 0):
        raise ValueError(f"length must be a non-negative token count (integer), got {length!r}")
    expected = max_response_length - buffer_length
    penalty = np.clip((expected - lengths) / buffer_length, -1.0, 0.0) * penalty_factor
    return float(penalty) if penalty.ndim == 0 else penalty.astype(np.float32)


def overlong_filter_weights(truncated) -> np.ndarray:
    """Loss weight per answer under overlong filtering: 0 for a truncated answer, 1 otherwise."""
    return 1.0 - np.asarray(truncated, dtype=np.float32)
