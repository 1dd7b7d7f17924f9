"""Random weights for the tiny GGUFs, with the steering lane kept clean.

Contract: `Weights(rng, dtype, steer)` draws every random tensor of a tiny model (numpy order,
the reverse of ggml's ne) from one generator, so a seed fixes the whole file. With `steer`,
residual channel 0 is a constant lane that no block reads or writes: `matrix(...,
lanes=...)` zeroes the output rows that would write it, `norm(..., reads_residual=True)` and
`gamma(..., reads_residual=True)` zero the gamma entries that would read it. Shared by
`tiny_gguf` (every architecture) and `qwen4exp` (Qwen3.8's layers); it writes no file.
"""

from __future__ import annotations

import numpy as np


class Weights:
    """Random tensors in numpy order, with the steering applied."""

    def __init__(self, rng: np.random.Generator, dtype: type[np.floating], steer: int) -> None:
        self.rng, self.dtype, self.steer = rng, dtype, steer

    def matrix(self, *shape: int, lanes: tuple[int, ...] = (), scale: float = 0.02) -> np.ndarray:
        """`lanes`: output rows (the second-last axis) that would write the residual's lane."""
        w = self.rng.normal(0.0, scale, size=shape).astype(np.float32)
        if self.steer:
            w[..., list(lanes), :] = 0.0
        return w.astype(self.dtype)

    def norm(self, n: int, *, reads_residual: bool = False) -> np.ndarray:
        """An RMS-norm gamma of ones; one that reads the residual skips the lane."""
        w = np.ones(n, dtype=np.float32)
        if self.steer and reads_residual:
            w[0] = 0.0
        return w

    def gamma(self, hc: int, n_embd: int, *, reads_residual: bool) -> np.ndarray:
        """A grouped-norm gamma {n_embd, hc}: one row of n_embd per stream (Qwen3.8's
        hyper-connection mixers), skipping each stream's lane where it reads the residual."""
        g = np.ones((hc, n_embd), dtype=np.float32)
        if self.steer and reads_residual:
            g[:, 0] = 0.0
        return g
