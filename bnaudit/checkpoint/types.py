"""Plain data types shared by the checkpoint readers, the byte-patching writer and the audit code (no I/O)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class ContainerFormat(str, Enum):
    """A checkpoint container, named as reports print it (registry: :mod:`bnaudit.checkpoint.formats`)."""

    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCH_TAR = "torch-tar"
    PICKLE = "pickle"
    SAFETENSORS = "safetensors"
    HF_SHARDED = "hf-sharded"
    DCP = "dcp"

    def __str__(self) -> str:
        return self.value


# dtype names follow torch's spelling without the "torch." prefix; bfloat16 and the fp8 types have no NumPy
# dtype and are decoded by hand.
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
ITEMSIZE: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}
NUMPY_DTYPES: dict[str, str] = {
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "int8": "i1",
    "uint8": "u1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "uint32": "<u4",
    "int64": "<i8",
    "uint64": "<u8",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
}


@dataclass(frozen=True)
class StorageRef:
    """One raw storage inside a checkpoint file.

    Attributes:
        path: the file holding the bytes.
        key: the storage's name in its container (zip entry name such as ``archive/data/3``, a safetensors
            tensor name, or a legacy storage key).
        file_offset: absolute byte offset of the storage's first byte in ``path``.
        nbytes: size of the storage in bytes.
        dtype: element type the storage was saved with (torch spelling, e.g. ``float32``).
        compressed: True when the bytes are stored deflated inside a zip entry; ``file_offset`` is then the
            offset of the compressed data, the bytes are decompressed on read, and the byte-patching writer
            refuses the storage.
        inline: the storage's bytes themselves, for data that lies in a pickle rather than beside it
            (NumPy arrays pickled with ``pickle.dump``); ``file_offset`` is then 0, the bytes are read from
            here, and the byte-patching writer refuses the storage.
    """

    path: Path
    key: str
    file_offset: int
    nbytes: int
    dtype: str
    compressed: bool = False
    inline: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def in_file(self) -> bool:
        """The bytes lie uncompressed at ``file_offset`` in ``path``, where a ``pread`` finds them."""
        return not self.compressed and self.inline is None


@dataclass(frozen=True)
class ChunkedTensor:
    """Where a DCP tensor saved in several chunks (sharded by FSDP / DTensor) lies; assembled when read.

    Attributes:
        item: names the item (the folder's ``.metadata`` and the key); it holds no bytes itself.
        chunks: (offsets of the chunk in the whole tensor, the chunk's own lazy tensor), one per chunk.
        display: the folder and key, for messages.
    """

    item: StorageRef
    chunks: tuple[tuple[tuple[int, ...], TensorRef], ...]
    display: str


@dataclass(frozen=True)
class RefusedTensor:
    """A tensor whose shape and dtype are known but whose bytes bnaudit will not read, and why.

    Attributes:
        item: where the tensor is stored.
        folder: the checkpoint (folder) that holds it, for the error a read raises.
        why: what makes it unreadable ("stored deflated").
        fix: what the user can do instead.
    """

    item: StorageRef
    folder: str
    why: str
    fix: str


TensorLocation = StorageRef | ChunkedTensor | RefusedTensor
"""Where a tensor's bytes are: a storage in a file, chunks to assemble, or nowhere bnaudit reads."""


@dataclass(frozen=True)
class TensorRef:
    """A lazy reference to a tensor: nothing is read until :func:`bnaudit.checkpoint.tensors.read_tensor`.

    Attributes:
        location: where the bytes live (a storage for every file format; chunks or a refusal for DCP).
        dtype: the tensor's element type (torch spelling).
        shape: the tensor's shape.
        stride: strides in elements (C-contiguous when the tensor was contiguous).
        offset: storage offset in elements.
        requires_grad: recorded for completeness; a parameter saved as ``nn.Parameter`` has it True.
    """

    location: TensorLocation
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    requires_grad: bool = False

    @property
    def storage(self) -> StorageRef:
        """The storage holding the bytes (for an assembled or refused tensor: the item it names)."""
        location = self.location
        return location if isinstance(location, StorageRef) else location.item

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def is_floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def is_contiguous(self) -> bool:
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True

    def byte_span(self) -> tuple[int, int]:
        """Absolute [start, end) byte range in the file covering every element of the tensor."""
        if self.numel == 0:
            start = self.storage.file_offset + self.offset * self.itemsize
            return start, start
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        return (
            self.storage.file_offset + self.offset * self.itemsize,
            self.storage.file_offset + (last + 1) * self.itemsize,
        )


@dataclass
class Placeholder:
    """An inert stand-in for an object the pickle would have built by calling ``module.name``.

    Nothing is imported or called: the arguments (``args``, ``kwargs``), the BUILD state (``state``), list
    items (``items``) and dict items (``dict_items``) are only recorded.
    """

    module: str
    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    items: list[Any] = field(default_factory=list)
    dict_items: dict[Any, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class GlobalRef:
    """A global (``module.name``) a pickle references; ``call``: the opcode or helper of torch.load's first
    call of it ("REDUCE", "INST", "copyreg._reconstructor", ...), "" when only named or built by __new__."""

    module: str
    name: str
    source: str  # the pickle it came from, e.g. "archive/data.pkl" or ".metadata"
    call: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class StateDictRef:
    """One state dict found in a checkpoint.

    Attributes:
        name: where it was found, as a ``/``-joined key path (``model``, ``state_dict_ema``, ``""`` for the
            top level). This is the name used in reports and by ``--key``.
        path: the same key path as a tuple of the container keys.
        tensors: original key -> lazy tensor, in the file's order.
    """

    name: str
    path: tuple[Any, ...]
    tensors: dict[str, TensorRef]

    @property
    def display_name(self) -> str:
        return self.name or "<root>"


@dataclass
class Checkpoint:
    """A checkpoint opened for reading.

    Attributes:
        path: the file (or DCP directory / sharded index) given by the user.
        format: the container format.
        root: the untouched container as rebuilt by the inert unpickler (dicts, lists, Placeholders,
            TensorRefs); for safetensors a dict of name -> TensorRef.
        state_dicts: every state dict found, in the order they were found (filled by ``load_checkpoint``
            after the reader returns).
        globals: every global referenced by the file's pickles (for the security audit).
        metadata: safetensors header metadata (empty for other formats).
        warnings: non-fatal oddities met while reading (unknown rebuild functions, skipped objects).
        crc32_absent: a torch zip written without CRC-32s (``compute_crc32 = False``): its bytes were read
            unverified.
        ambiguities: how torch.load and zipfile would read the archive differently (``ambiguous-archive``).
    """

    path: Path
    format: ContainerFormat
    root: Any
    state_dicts: list[StateDictRef] = field(default_factory=list)
    globals: list[GlobalRef] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    crc32_absent: bool = False
    ambiguities: list[str] = field(default_factory=list)

    def state_dict(self, name: str) -> StateDictRef:
        for sd in self.state_dicts:
            if sd.name == name:
                return sd
        raise KeyError(name)


def iter_tensors(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], TensorRef]]:
    """Yield (key path, TensorRef) for every tensor nested in dicts and lists of ``obj``."""
    if isinstance(obj, TensorRef):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from iter_tensors(v, (*prefix, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, (*prefix, i))
