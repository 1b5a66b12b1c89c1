"""Plain-data encodings shared by the PSF models and the file formats (no pickle anywhere)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from .errors import DataModelError

__all__ = ["encode_array", "decode_array"]


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Encode a numeric array as JSON-able data: dtype, shape and base64 little-endian bytes."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise DataModelError(f"cannot encode an array of dtype {arr.dtype}")
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": le.dtype.str,
        "shape": list(arr.shape),
        "data": base64.b64encode(np.ascontiguousarray(le).tobytes()).decode("ascii"),
    }


def decode_array(data: dict[str, Any], *, field: str = "array") -> np.ndarray:
    """Inverse of :func:`encode_array`; ``field`` names the value in error messages."""
    try:
        dtype = np.dtype(data["dtype"])
        shape = tuple(int(n) for n in data["shape"])
        raw = base64.b64decode(data["data"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataModelError(f"{field}: not an encoded array ({exc})") from None
    if dtype.kind not in "biuf":
        raise DataModelError(f"{field}: unsupported dtype {dtype}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataModelError(
            f"{field}: {len(raw)} bytes for shape {shape} and dtype {dtype}, expected {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
