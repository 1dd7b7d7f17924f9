"""Random K-quant (and Q8_0) blocks with valid, small scale fields, as llama.cpp reads them.

Contract: `random_blocks(qtype, n, bitgen)` returns n blocks of a ggml quant type as a uint8
array: random quants, and fixed scale fields chosen so that the weights come out zero-mean
with a standard deviation near 0.018 (real layers sit around 0.02), so activations stay
small and nothing overflows to inf/NaN, in f16 either. Used by the tiny model generator
(K-quant tiny models) and the full-size synthetic model of the GPU benchmarks. The `gguf`
package cannot quantize to K-quants, which is why the blocks are written directly.
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

F16 = np.dtype("<f2")


def _f16_bytes(value: float) -> np.ndarray:
    return np.frombuffer(np.array([value], dtype=F16).tobytes(), dtype=np.uint8)


def _kquant_scales(sc: int, m: int) -> np.ndarray:
    """The 12-byte 6-bit scale/min field of Q4_K and Q5_K with every sub-block = (sc, m).

    ggml's get_scale_min_k4: sub-blocks 0-3 read scales[j] & 63 and scales[j+4] & 63;
    sub-blocks 4-7 read the low/high nibbles of scales[j+4] plus the top two bits of
    scales[j-4] / scales[j]. With sc, m < 16 those top bits are zero.
    """
    assert 0 <= sc < 16 and 0 <= m < 16
    return np.array([sc] * 4 + [m] * 4 + [(sc & 0xF) | (m << 4)] * 4, dtype=np.uint8)


def _block_header(qtype: gguf.GGMLQuantizationType) -> list[tuple[int, np.ndarray]]:
    """(byte offset, bytes) fields that overwrite the random bytes of every block."""
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]: w = d*sc*q - dmin*m, q in 0..15
        d, sc = 1e-3, 4
        return [(0, _f16_bytes(d)), (2, _f16_bytes(d * 7.5)), (4, _kquant_scales(sc, sc))]
    if qtype == Q.Q5_K:  # d, dmin, scales[12], qh[32], qs[128]: q in 0..31
        d, sc = 5e-4, 4
        return [(0, _f16_bytes(d)), (2, _f16_bytes(d * 15.5)), (4, _kquant_scales(sc, sc))]
    if qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], d: w = d*scale*(q-32)
        return [(192, np.ones(16, dtype=np.uint8)), (208, _f16_bytes(1e-3))]
    if qtype == Q.Q8_0:  # d, int8 qs[32]
        return [(0, _f16_bytes(2.5e-4))]
    raise ValueError(f"no block recipe for {qtype.name}")


def random_blocks(
    qtype: gguf.GGMLQuantizationType, n_blocks: int, bitgen: np.random.BitGenerator
) -> np.ndarray:
    """`n_blocks` blocks of `qtype` as a (n_blocks, block_bytes) uint8 array."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    n_bytes = n_blocks * size
    # random_raw is ~10x faster than Generator.integers for plain random bytes.
    raw = bitgen.random_raw(-(-n_bytes // 8)).view(np.uint8)[:n_bytes]
    blocks = raw.reshape(n_blocks, size)
    for offset, field in _block_header(qtype):
        blocks[:, offset : offset + field.size] = field
    return blocks
