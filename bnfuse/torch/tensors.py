"""Tensor <-> numpy for the fold: exact float64 in, the layer's dtype out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    if dtype == torch.bfloat16:
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor of the array's values and dtype (bfloat16, which torch cannot take, included)."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's values in its own dtype (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype(torch.bfloat16))
    return t.numpy()


def input_dtype(module: Any) -> torch.dtype:
    """The dtype a module's floating inputs take: that of its first floating parameter."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            dtype: torch.dtype = t.dtype
            return dtype
    return torch.float32


def as_f64_or_none(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else as_f64(t)


def as_f64(t: torch.Tensor) -> np.ndarray:
    """float64 copy: exact for every float dtype (bf16 and fp16 widen exactly)."""
    return t.detach().to("cpu", torch.float64).numpy()


def to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A rounded array (fold.round_to) as a tensor of ``like``'s dtype and device."""
    if like.dtype == torch.bfloat16:
        bits = torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy())
        return bits.view(torch.bfloat16).to(like.device)
    return torch.from_numpy(np.ascontiguousarray(array).copy()).to(like.device)
