"""Decode raw tensor bytes NumPy has no dtype for (bf16, fp8), and encode float64 values as torch would."""

from __future__ import annotations

import numpy as np

from bnaudit.checkpoint.types import NUMPY_DTYPES
from bnaudit.errors import InputError

# Raw unsigned views of the dtypes NumPy cannot represent; they are decoded to float64 by hand.
RAW_DTYPES = {"bfloat16": "<u2", "float8_e4m3fn": "u1", "float8_e5m2": "u1", "float8_e4m3fnuz": "u1",
               "float8_e5m2fnuz": "u1"}  # fmt: skip


class DtypeOverflowError(InputError, ValueError):
    """A finite value does not fit the target dtype (it would become infinity)."""


def _fp8_table(exp_bits: int, man_bits: int, bias: int, variant: str) -> np.ndarray:
    """The exact float64 value of each of the 256 codes of an fp8 format."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = (codes & ((1 << man_bits) - 1)).astype(np.float64)
    subnormal = man * 2.0 ** (1 - bias - man_bits)
    normal = (1.0 + man / 2.0**man_bits) * np.exp2((exp - bias).astype(np.float64))
    values = sign * np.where(exp == 0, subnormal, normal)
    top = (1 << exp_bits) - 1
    if variant == "fn":  # e4m3fn: no infinities, only S.1111.111 is NaN
        values[(exp == top) & (man == (1 << man_bits) - 1)] = np.nan
    elif variant == "ieee":  # e5m2: IEEE-style infinities and NaNs
        values[(exp == top) & (man == 0)] = sign[(exp == top) & (man == 0)] * np.inf
        values[(exp == top) & (man != 0)] = np.nan
    else:  # fnuz: no infinities, no negative zero; 0x80 is the only NaN
        values[0x80] = np.nan
    return values


_FP8_TABLES = {
    "float8_e4m3fn": _fp8_table(4, 3, 7, "fn"),
    "float8_e5m2": _fp8_table(5, 2, 15, "ieee"),
    "float8_e4m3fnuz": _fp8_table(4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": _fp8_table(5, 2, 16, "fnuz"),
}


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """``raw`` values of ``dtype`` as an array: float64 for bfloat16 and the fp8 types (exact), else as is."""
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: shift the bits back into place.
        with np.errstate(invalid="ignore"):  # signalling NaN codes widen to quiet NaNs, as in torch
            return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    table = _FP8_TABLES.get(dtype)
    if table is not None:
        return np.asarray(table[raw])
    return raw


def _check_overflow(values: np.ndarray, encoded: np.ndarray, dtype: str) -> None:
    bad = np.isfinite(values) & ~np.isfinite(encoded)
    if bad.any():
        first = float(values[bad].flat[0])
        raise DtypeOverflowError(
            f"does not fit {dtype} (it would become infinity)",
            found=repr(first),
            fix="the statistics are out of range for this dtype — check the inputs or save in float32",
        )


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    # torch converts float64 -> float32 -> bfloat16 (round to nearest even on the float32 bits); do the same
    # so the bytes written equal torch's.
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(f32)] = 0x7FC0  # torch writes every NaN as the canonical quiet NaN
    return out


def encode_like(values: np.ndarray, dtype: str) -> bytes:
    """Convert float64 values to the raw little-endian bytes of ``dtype``, as torch would convert them.

    Args:
        values: the values, any shape; written in C order.
        dtype: ``float16``, ``bfloat16``, ``float32``, ``float64`` or an integer dtype (values must be
            integral and in range).

    Returns:
        ``values.size * itemsize`` bytes.

    Raises:
        DtypeOverflowError: a finite value becomes infinite in ``dtype``, or an integer is out of range
            (also a ``ValueError``).
        ValueError: the dtype is not supported for writing.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    if dtype == "bfloat16":
        bits = _to_bfloat16_bits(values)
        _check_overflow(values, decode(bits, "bfloat16"), dtype)
        return bits.astype("<u2").tobytes()
    if dtype in ("float16", "float32", "float64"):
        with np.errstate(over="ignore"):
            # float16 goes through float32 like torch's double -> half conversion.
            wide = values.astype(np.float32) if dtype == "float16" else values
            encoded = wide.astype(NUMPY_DTYPES[dtype])
        _check_overflow(values, encoded, dtype)
        return encoded.tobytes()
    if dtype in NUMPY_DTYPES and dtype.startswith(("int", "uint")):
        info = np.iinfo(np.dtype(NUMPY_DTYPES[dtype]))
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise DtypeOverflowError(
                f"{dtype} needs integral values", found="non-integers", fix="round them first"
            )
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise DtypeOverflowError(f"does not fit {dtype}", found=f"values {values.min()}..{values.max()}")
        return values.astype(NUMPY_DTYPES[dtype]).tobytes()
    raise ValueError(
        f"encode_like cannot write dtype {dtype}; supported: float16, bfloat16, float32, float64, ints"
    )
