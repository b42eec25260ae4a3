"""Cosines of a query with many vectors, fast, each within a bound that is proven, not guessed.

At 100,000 MiniLM vectors the exact float32 product takes 17-20 ms on one core of this project's
machine; it reads 154 MB. Here the vectors are quantized to int8 per row (scale = the row's
largest magnitude / 127) and multiplied by FBGEMM's dynamic int8 kernel, which quantizes the
query to 7 bits itself (`reduce_range`, which keeps its 16-bit pair sums from saturating) and
reads a quarter of the bytes: about 6 ms. The answer for row r is off by at most

    |q| * |v_r - deq(v_r)|  +  sqrt(d) * (range(q) / 127) / 2 * |deq(v_r)|

(the row's own rounding, then the query's: each query element moves by at most half a 7-bit
step), doubled here for the float arithmetic around it; the largest row bound is `bound`.
Measured on MiniLM vectors of LoCoMo the true error stayed under an eighth of this bound.

A caller that needs exact results takes every candidate the bound cannot rule out and scores
those exactly (the hybrid reader does). Rows appended after the matrix was packed are scored
exactly until there are enough of them to pack again.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Rows appended since packing, scored exactly, before the whole matrix is packed again.
REPACK_TAIL = 4096
SAFETY = 2.0


class QuantizedRows:
    """An int8 copy of the first `packed` rows of a float32 matrix, for `scores`."""

    def __init__(self, matrix: np.ndarray) -> None:
        import torch

        weights = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        scale = (weights.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero = torch.zeros(len(weights), dtype=torch.long)
        with warnings.catch_warnings():
            # Quantized tensors are deprecated in torch; `quantize` falls back to exact when gone.
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_channel(weights, scale, zero, 0, torch.qint8)
        restored = quantized.dequantize()
        self._packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.packed = len(matrix)
        self.dim = matrix.shape[1]
        self._row_error = float((weights - restored).norm(dim=1).max()) if len(matrix) else 0.0
        self._row_norm = float(restored.norm(dim=1).max()) if len(matrix) else 0.0

    def scores(self, matrix: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, float]:
        """Approximate `matrix @ q` for every row of `matrix` (whose first `packed` rows are the
        ones packed), and the bound on any row's error (rows past `packed` are exact)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))[None]
        head = torch.ops.quantized.linear_dynamic(x, self._packed, True)[0].numpy()
        tail = matrix[self.packed :] @ q
        step = (max(float(q.max()), 0.0) - min(float(q.min()), 0.0)) / 127
        bound = float(np.linalg.norm(q)) * self._row_error + math.sqrt(self.dim) * step / 2 * self._row_norm
        return np.concatenate([head.astype(np.float32), tail]), SAFETY * bound + 1e-6


def quantize(matrix: np.ndarray) -> QuantizedRows | None:
    """`QuantizedRows` of `matrix`, or None where the int8 kernel is not available (a CPU or a
    torch build without FBGEMM): the caller then computes exactly."""
    try:
        import torch

        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return None
        return QuantizedRows(matrix)
    except (ImportError, RuntimeError, AttributeError) as e:
        log.info("int8 scoring unavailable (%s); using exact float32", e)
        return None


def stale(rows: Any, n: int) -> bool:
    """Whether `rows` (a QuantizedRows or None) no longer covers enough of `n` rows."""
    return rows is None or rows.packed > n or n - rows.packed > REPACK_TAIL


__all__ = ["REPACK_TAIL", "QuantizedRows", "quantize", "stale"]
