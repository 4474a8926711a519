"""Reading a GGUF file back with gguf.GGUFReader (a reader independent of our writer): key/values and tensors.

Tensors are dequantized here, not through gguf.quants: f16 and f32 as stored, bf16 as the top half of an f32,
q8_0 as blocks of 34 bytes (an f16 scale d, then 32 int8 q; value = d * q), as ggml-quants.c lays them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tinyllama_mcp.errors import SelfCheckError

Q8_0_BLOCK, Q8_0_BYTES = 32, 34
Q = gguf.GGMLQuantizationType


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The reader of `path`; SelfCheckError when the file is not a whole GGUF file."""
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    except (ValueError, KeyError, IndexError, OverflowError, OSError) as exc:
        raise SelfCheckError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated "
                             "or corrupted: export again") from None
    if end > path.stat().st_size:
        raise SelfCheckError(f"{path.name} is truncated: its tensors end at byte {end} but the file has "
                             f"{path.stat().st_size}; export again")
    return reader


def fields_of(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key/value as a Python value (arrays as lists), the GGUF.* header entries left out."""
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            try:
                out[name] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError) as exc:
                raise SelfCheckError(f"GGUF key {name!r} cannot be read ({exc}); the file is corrupted") from None
    return out


def tensor_array(tensor) -> np.ndarray:
    """One tensor as float32 in numpy order (rows first), dequantized by the rules in this module's docstring."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    raw = np.asarray(tensor.data)
    kind = tensor.tensor_type
    if kind == Q.F32:
        values = raw.astype(np.float32)
    elif kind == Q.F16:
        values = raw.astype(np.float32)
    elif kind == Q.BF16:
        values = (raw.reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind == Q.Q8_0:
        blocks = raw.reshape(-1, Q8_0_BYTES)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        values = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scale
    else:
        raise SelfCheckError(f"tensor {tensor.name} is of type {kind.name}, which this export never writes")
    return values.reshape(shape)


def tensors_of(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: tensor_array(t) for t in reader.tensors}


def tensor_types(reader: gguf.GGUFReader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}
