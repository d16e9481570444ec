"""Checkpoint reading: format detection, inert loading, lazy tensors and state dict discovery."""

from __future__ import annotations

from bnaudit.checkpoint.detect import detect_format
from bnaudit.checkpoint.discover import find_state_dicts, select_state_dicts
from bnaudit.checkpoint.formats import FORMAT_SPECS, FormatFamily, FormatSpec, format_spec
from bnaudit.checkpoint.load import load_checkpoint
from bnaudit.checkpoint.tensor_codec import DtypeOverflowError, encode_like
from bnaudit.checkpoint.tensors import read_tensor, read_tensors
from bnaudit.checkpoint.types import (
    Checkpoint,
    ContainerFormat,
    GlobalRef,
    Placeholder,
    StateDictRef,
    StorageRef,
    TensorRef,
    iter_tensors,
)

__all__ = [
    "FORMAT_SPECS",
    "Checkpoint",
    "ContainerFormat",
    "DtypeOverflowError",
    "FormatFamily",
    "FormatSpec",
    "GlobalRef",
    "Placeholder",
    "StateDictRef",
    "StorageRef",
    "TensorRef",
    "detect_format",
    "encode_like",
    "find_state_dicts",
    "format_spec",
    "iter_tensors",
    "load_checkpoint",
    "read_tensor",
    "read_tensors",
    "select_state_dicts",
]
