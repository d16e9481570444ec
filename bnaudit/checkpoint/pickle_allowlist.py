"""The allowlist of pickle globals: the only names whose use at ``torch.load`` time is known to be inert.

A global is judged by the object ``torch.load`` would reach: the module named, then the attribute path
(protocol 4 walks dotted names attribute by attribute). Only the exact ``module.path`` pairs below are
inert; anything else is unknown, whatever its module (see :mod:`bnaudit.bn.pickle_policy` for what an
unknown global makes of a file). Each group carries the one-line reason it is here, and
``tests/checkpoint/test_pickle_allowlist.py`` checks every entry against the installed libraries: adding
an entry means adding it there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Inertness(str, Enum):
    """How an allowlisted global is inert.

    ``safe``: tensor machinery and plain containers that ``torch.load(weights_only=True)`` also accepts.
    ``benign``: data classes that run no code of the file when built, but that ``weights_only=True``
    refuses (argparse.Namespace, NumPy scalars, datetime, torch.nn module classes...).
    """

    SAFE = "safe"
    BENIGN = "benign"


@dataclass(frozen=True)
class AllowGroup:
    """Globals allowed for one reason: ``module`` and the attribute paths inside it."""

    module: str  # "*" for the storage names, allowed in any module
    names: tuple[str, ...]  # attribute paths, dotted only for nested classes
    inertness: Inertness
    reason: str  # one line, shown by `bnaudit inspect --security`


def _group(module: str, names: str, inertness: Inertness, reason: str) -> AllowGroup:
    return AllowGroup(module, tuple(names.split()), inertness, reason)


_S, _B = Inertness.SAFE, Inertness.BENIGN
_TENSOR = "torch's tensor rebuild functions: they build a tensor on a storage of the file"
_NN = "torch.nn module classes: whole-module pickles build them with __new__ and Module.__setstate__"
_DCP = "torch.distributed.checkpoint's metadata records (dataclasses and enums of plain values)"
_NUMPY = "NumPy array, dtype and scalar reconstruction from raw bytes"

ALLOW_GROUPS: tuple[AllowGroup, ...] = (
    _group("collections", "OrderedDict", _S, "the state dict container"),
    _group("builtins", "dict list set frozenset tuple int float complex bool str bytes bytearray slice", _S,
           "plain data types (bnaudit builds them only from plain data)"),
    _group("_codecs", "encode", _S, "protocol 2 spells bytes as _codecs.encode(text, 'latin1')"),
    _group("copyreg", "_reconstructor __newobj__ __newobj_ex__", _S,
           "protocol 0-2 object construction; the class they construct is judged on its own"),
    _group("torch._utils", "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter "
           "_rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor", _S, _TENSOR),
    _group("torch._tensor", "_rebuild_from_type_v2 _rebuild_from_type Tensor", _S,
           "tensor subclass rebuild; the function it calls is judged on its own"),
    _group("torch", "Tensor Size device", _S, "tensor, shape and device types"),
    _group("torch.nn.parameter", "Parameter Buffer", _S, "parameter and buffer tensor types"),
    _group("torch", "FloatTensor DoubleTensor HalfTensor BFloat16Tensor LongTensor IntTensor ShortTensor "
           "CharTensor ByteTensor BoolTensor", _S, "legacy tensor type names (the pre-1.0 tar format)"),
    _group("torch.serialization", "_get_layout", _S, "looks a tensor layout up by name"),
    _group("torch", "float16 float32 float64 bfloat16 half float double int8 int16 int32 int64 uint8 uint16 "
           "uint32 uint64 bool complex64 complex128 cfloat cdouble long int short float8_e4m3fn "
           "float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz strided sparse_coo contiguous_format "
           "channels_last channels_last_3d preserve_format", _S, "torch dtype, layout and memory format "
           "constants"),
    _group("argparse", "Namespace", _B, "training scripts' arguments (timm's 'args')"),
    _group("collections", "defaultdict Counter deque", _B, "containers; a default factory is not called"),
    _group("datetime", "datetime date time timedelta timezone", _B, "timestamps built from bytes"),
    _group("pathlib", "Path PosixPath WindowsPath PurePath PurePosixPath PureWindowsPath", _B,
           "paths built from strings; nothing is opened"),
    _group("types", "SimpleNamespace", _B, "an attribute bag"),
    _group("builtins", "object range", _B, "the base class copyreg names, and ranges of ints"),
    _group("numpy", "dtype ndarray", _B, _NUMPY),
    _group("numpy.core.multiarray", "scalar _reconstruct", _B, _NUMPY + " (NumPy 1)"),
    _group("numpy._core.multiarray", "scalar _reconstruct", _B, _NUMPY + " (NumPy 2)"),
    _group("numpy.core.numeric", "_frombuffer", _B, _NUMPY + " (NumPy 1, protocol 5)"),
    _group("numpy._core.numeric", "_frombuffer", _B, _NUMPY + " (NumPy 2, protocol 5)"),
    _group("numpy.dtypes", "Float16DType Float32DType Float64DType Int8DType Int16DType Int32DType "
           "Int64DType UInt8DType UInt16DType UInt32DType UInt64DType BoolDType", _B, _NUMPY),
    _group("lightning.fabric.utilities.data", "AttributeDict", _B, "Lightning's hyper_parameters"),
    _group("lightning.pytorch.utilities.parsing", "AttributeDict", _B, "Lightning's hyper_parameters"),
    _group("pytorch_lightning.utilities.parsing", "AttributeDict", _B, "Lightning's hyper_parameters"),
    _group("torch.distributed.checkpoint.metadata", "BytesStorageMetadata ChunkStorageMetadata Metadata "
           "MetadataIndex StorageMeta TensorProperties TensorStorageMetadata _MEM_FORMAT_ENCODING", _S, _DCP),
    _group("torch.distributed.checkpoint.filesystem", "_StorageInfo", _S, _DCP),
    _group("torch.distributed.checkpoint.planner", "LoadItemType WriteItemType", _S, _DCP),
    _group("torch.nn.modules.module", "Module", _B, _NN),
    _group("torch.nn.modules.activation", "CELU ELU GELU GLU Hardshrink Hardsigmoid Hardswish Hardtanh "
           "LeakyReLU LogSigmoid LogSoftmax Mish MultiheadAttention PReLU RReLU ReLU ReLU6 SELU SiLU "
           "Sigmoid Softmax Softmax2d Softmin Softplus Softshrink Softsign Tanh Tanhshrink Threshold",
           _B, _NN),
    _group("torch.nn.modules.batchnorm", "BatchNorm1d BatchNorm2d BatchNorm3d LazyBatchNorm1d "
           "LazyBatchNorm2d LazyBatchNorm3d SyncBatchNorm _BatchNorm _LazyNormBase _NormBase", _B, _NN),
    _group("torch.nn.modules.container", "ModuleDict ModuleList ParameterDict ParameterList Sequential", _B,
           _NN),
    _group("torch.nn.modules.conv", "Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d "
           "LazyConv1d LazyConv2d LazyConv3d LazyConvTranspose1d LazyConvTranspose2d LazyConvTranspose3d",
           _B, _NN),
    _group("torch.nn.modules.dropout", "AlphaDropout Dropout Dropout1d Dropout2d Dropout3d "
           "FeatureAlphaDropout", _B, _NN),
    _group("torch.nn.modules.flatten", "Flatten Unflatten", _B, _NN),
    _group("torch.nn.modules.instancenorm", "InstanceNorm1d InstanceNorm2d InstanceNorm3d "
           "LazyInstanceNorm1d LazyInstanceNorm2d LazyInstanceNorm3d", _B, _NN),
    _group("torch.nn.modules.linear", "Bilinear Identity LazyLinear Linear NonDynamicallyQuantizableLinear",
           _B, _NN),
    _group("torch.nn.modules.normalization", "GroupNorm LayerNorm LocalResponseNorm RMSNorm", _B, _NN),
    _group("torch.nn.modules.padding", "ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d "
           "ReflectionPad2d ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d ZeroPad1d "
           "ZeroPad2d ZeroPad3d CircularPad1d CircularPad2d CircularPad3d", _B, _NN),
    _group("torch.nn.modules.pixelshuffle", "PixelShuffle PixelUnshuffle", _B, _NN),
    _group("torch.nn.modules.pooling", "AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d "
           "AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d AvgPool1d AvgPool2d AvgPool3d "
           "FractionalMaxPool2d FractionalMaxPool3d LPPool1d LPPool2d LPPool3d MaxPool1d MaxPool2d "
           "MaxPool3d MaxUnpool1d MaxUnpool2d MaxUnpool3d", _B, _NN),
    _group("torch.nn.modules.rnn", "GRU GRUCell LSTM LSTMCell RNN RNNCell", _B, _NN),
    _group("torch.nn.modules.sparse", "Embedding EmbeddingBag", _B, _NN),
    _group("torch.nn.modules.transformer", "Transformer TransformerDecoder TransformerDecoderLayer "
           "TransformerEncoder TransformerEncoderLayer", _B, _NN),
    _group("torch.nn.modules.upsampling", "Upsample UpsamplingBilinear2d UpsamplingNearest2d", _B, _NN),
    _group("torch.nn.modules.channelshuffle", "ChannelShuffle", _B, _NN),
    _group("torch.nn.modules.distance", "CosineSimilarity PairwiseDistance", _B, _NN),
    _group("torch.nn.modules.fold", "Fold Unfold", _B, _NN),
)  # fmt: skip

# Storage classes are never imported: torch.load's find_class answers any name containing "Storage" that
# names a storage type with a StorageType of its own, whatever the module (torch/serialization.py).
_STORAGES = (
    "FloatStorage DoubleStorage HalfStorage BFloat16Storage LongStorage IntStorage ShortStorage CharStorage "
    "ByteStorage BoolStorage ComplexFloatStorage ComplexDoubleStorage QInt8Storage QUInt8Storage "
    "QInt32Storage QUInt4x2Storage QUInt2x4Storage UntypedStorage TypedStorage _UntypedStorage"
)
STORAGE_NAMES = frozenset(_STORAGES.split())

_INDEX: dict[tuple[str, str], AllowGroup] = {
    (group.module, name): group for group in ALLOW_GROUPS for name in group.names
}


def allowed(module: str, name: str) -> AllowGroup | None:
    """The allowlist group of ``module`` + attribute path ``name``, or None when it is not allowed.

    Storage names are allowed in any module: torch.load never imports the module for them.
    """
    group = _INDEX.get((module, name))
    if group is None and name in STORAGE_NAMES:
        return _STORAGE_GROUP
    return group


_STORAGE_GROUP = AllowGroup("*", tuple(sorted(STORAGE_NAMES)), _S, "storage types torch.load never imports")


# Globals that are an error however the pickle uses them: even merely named, torch.load(weights_only=False)
# imports them and hands them to the caller. Entries are "module.name" or "module.*" (the module and its
# submodules). Everything called and not allowed is an error anyway; this list also catches those named.
DENY_GROUPS: tuple[tuple[str, str], ...] = (
    ("os.* posix.* nt.* subprocess.* pty.* shutil.* signal.* _posixsubprocess.* multiprocessing.*",
     "run commands, processes, or touch files"),
    ("builtins.eval builtins.exec builtins.compile builtins.__import__ builtins.getattr builtins.setattr "
     "builtins.delattr builtins.open builtins.input builtins.breakpoint builtins.globals builtins.locals "
     "builtins.vars builtins.apply builtins.execfile builtins.memoryview builtins.help builtins.exit "
     "builtins.quit builtins.print", "evaluate code, reach attributes or open files"),
    ("runpy.* importlib.* _frozen_importlib.* _frozen_importlib_external.* zipimport.* pkgutil.* imp.* "
     "code.* codeop.* types.FunctionType types.CodeType types.MethodType marshal.* ctypes.* _ctypes.*",
     "import modules or build code"),
    ("pickle.* _pickle.* dill.* cloudpickle.* joblib.* shelve.* torch.load torch.serialization.* "
     "torch.storage._load_from_bytes numpy.load numpy.lib.* torch.hub.* torch.jit.* torch.package.* "
     "torch._C.* torch.ops.* torch._dynamo.* torch._inductor.* torch.fx.* torch.utils.collect_env.* "
     "torch.utils.cpp_extension.*", "unpickle or compile more code"),
    ("socket.* ssl.* http.* urllib.* requests.* aiohttp.* webbrowser.* smtplib.* ftplib.* asyncio.*",
     "reach the network"),
    ("io.* _io.* codecs.open tempfile.* fcntl.* mmap.* logging.config.* sqlite3.* glob.*", "open files"),
    ("functools.partial functools.reduce _functools.* operator.* _operator.* itertools.*",
     "call what they are given"),
    ("sys.* gc.* inspect.* threading.* _thread.* pdb.* bdb.* doctest.* pydoc.* timeit.* cProfile.* "
     "profile.* trace.* idlelib.* lib2to3.* distutils.* setuptools.* pip.* venv.* ensurepip.* site.*",
     "reach the interpreter or run programs"),
)  # fmt: skip

# Modules whose import alone runs something (opens a browser, starts a program): naming any of their
# globals is an error, since torch.load imports the module before it looks the name up.
IMPORT_ACTS = ("antigravity", "this", "__hello__", "__phello__", "turtledemo", "idlelib")


_DENIED_MODULES: dict[str, str] = {}
_DENIED_NAMES: dict[str, str] = {}
for _entries, _reason in DENY_GROUPS:
    for _entry in _entries.split():
        if _entry.endswith(".*"):
            _DENIED_MODULES[_entry[:-2]] = _reason
        else:
            _DENIED_NAMES[_entry] = _reason


def denied(module: str, name: str) -> str | None:
    """Why ``module.name`` is dangerous however it is used (None: it is not on the deny list).

    Lookups, not a scan of every entry: a hostile pickle can name hundreds of thousands of globals.
    """
    qualname = f"{module}.{name}"
    reason = _DENIED_NAMES.get(qualname)
    dot = qualname.find(".")
    while reason is None and dot >= 0:  # "module.*" covers every name under a prefix ending at a dot
        reason = _DENIED_MODULES.get(qualname[:dot])
        dot = qualname.find(".", dot + 1)
    return reason


def import_acts(module: str) -> bool:
    """Whether importing ``module`` alone runs a program (a ``__main__`` submodule, antigravity...)."""
    top = module.split(".", 1)[0]
    return top in IMPORT_ACTS or module.endswith(".__main__")
