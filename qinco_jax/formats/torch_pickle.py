"""Reading and writing PyTorch `.pt` files without PyTorch.

The reference stores a model as `torch.save(model)`: a zip archive holding

    <archive>/data.pkl        a pickle (protocol 2) of the whole nn.Module
    <archive>/data/<key>      the raw bytes of every tensor storage
    <archive>/byteorder, version, .format_version, ...

The pickle names its classes (`model_qinco QINCo`, `torch.nn.modules.linear Linear`, ...)
and rebuilds tensors through `torch._utils._rebuild_tensor_v2`; storages are "persistent
ids" ('storage', <type>, <key>, <location>, <numel>) resolved from the zip.

Loading a pickle normally imports and calls whatever it names. Here every global goes
through an explicit allow-list: module classes become inert `TorchModule` records,
tensors become numpy arrays, and the few callables a checkpoint needs (OrderedDict,
set, numpy scalars) are replaced by checked, side-effect-free functions. Any other
global is refused with a `CheckpointError` naming it, before anything runs.

The writer emits the same structure opcode by opcode, so that `torch.load` (with the
reference's `model_qinco` importable) rebuilds the reference's own classes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import math
import os
import pickle
import pickletools
import struct
import types
import zipfile
from typing import Any, Callable, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A file that is not a (supported, safe) QINCo checkpoint."""


# --------------------------------------------------------------------------------------
# Stand-ins for the pickled objects
# --------------------------------------------------------------------------------------


class TorchModule:
    """An inert record of a pickled nn.Module: its class name and its attributes.

    `attrs` is the module's __dict__ as saved: `_parameters` and `_buffers` map names
    to numpy arrays (or None), `_modules` maps names to sub-modules, and the class's
    own attributes (d, K, db_scale, ...) sit beside them."""

    torch_class = "?"
    attrs: Mapping[str, Any] = types.MappingProxyType({})  # until BUILD gives the state

    def __init__(self, *args):  # REDUCE may call the class; NEWOBJ calls only __new__
        self.attrs = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError(f"module {self.torch_class} has a state of type {type(state).__name__}, "
                                  "expected a dict")
        self.attrs = dict(state)

    @property
    def class_name(self) -> str:
        return self.torch_class.rsplit(".", 1)[-1]

    def get(self, name: str, default=None):
        return self.attrs.get(name, default)

    def __repr__(self):
        return f"<{self.torch_class} stand-in>"

    def named_tensors(self, prefix: str = "", _path: tuple = ()):
        """(name, array) of every parameter and persistent buffer, in torch's
        state_dict order and naming."""
        if any(m is self for m in _path) or len(_path) > _MAX_MODULE_DEPTH:
            raise CheckpointError(f"module {prefix or self.class_name!r} contains itself, or nests more than "
                                  f"{_MAX_MODULE_DEPTH} levels deep: not produced by torch.save")
        non_persistent = self.attrs.get("_non_persistent_buffers_set") or set()
        if not isinstance(non_persistent, (set, frozenset)):
            raise CheckpointError(f"module {prefix or self.class_name!r}: _non_persistent_buffers_set is a "
                                  f"{type(non_persistent).__name__}, not a set")
        for name, value in self._table("_parameters", prefix):
            if value is not None:
                yield prefix + name, _tensor(value, prefix + name)
        for name, value in self._table("_buffers", prefix):
            if value is not None and name not in non_persistent:
                yield prefix + name, _tensor(value, prefix + name)
        for name, sub in self._table("_modules", prefix):
            if sub is None:
                continue
            if not isinstance(sub, TorchModule):
                raise CheckpointError(f"sub-module {prefix + name!r} is a {type(sub).__name__}, not a module")
            yield from sub.named_tensors(prefix + name + ".", _path + (self,))

    def _table(self, key: str, prefix: str):
        """The (name, value) items of `_parameters`, `_buffers` or `_modules`: a dict by names."""
        table = self.attrs.get(key) or {}
        if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
            raise CheckpointError(f"module {prefix or self.class_name!r}: {key} is not a dict of names")
        return list(table.items())

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.named_tensors())


_MAX_MODULE_DEPTH = 32


def _tensor(value, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"tensor {name!r} is a {type(value).__name__}, not a tensor")
    return value

_MODULE_CLASSES = {
    ("model_qinco", "QINCo"),
    ("model_qinco", "QINCoLR"),
    ("model_qinco", "IVFQINCo"),
    ("model_qinco", "PQ_QINCo"),
    ("model_qinco", "QINCoStep"),
    ("torch.nn.modules.sparse", "Embedding"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.activation", "ReLU"),
}
_stub_classes: dict[tuple[str, str], type] = {}


def _module_stub(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stub_classes:
        _stub_classes[key] = type(name, (TorchModule,), {"torch_class": f"{module}.{name}"})
    return _stub_classes[key]


# Storage classes, by their name in the `torch` module. bfloat16 comes from ml_dtypes
# (a JAX dependency), since numpy has none.
def _storage_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
        "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
        "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
        "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
        "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    }


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


def _ordered_dict(*args):
    if args and args != ((),) and args != ([],):
        raise CheckpointError("OrderedDict rebuilt with arguments: not produced by torch.save")
    return collections.OrderedDict()


def _set(items=()):
    items = list(items)
    if not all(isinstance(i, (str, int)) for i in items):
        raise CheckpointError("a pickled set holds something other than names")
    return set(items)


def _codecs_encode(text, encoding="latin1"):
    # How protocol 2 pickles bytes: _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


_SIMPLE_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


def _numpy_dtype(spec, align=False, copy=True):
    if spec not in _SIMPLE_DTYPES:
        raise CheckpointError(f"numpy dtype {spec!r} is not a plain numeric type")
    # copy=True always: BUILD then calls __setstate__ on it, which must not touch
    # numpy's shared built-in dtype objects.
    return np.dtype(spec, align=bool(align), copy=True)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None \
            or dtype.kind not in "biuf":
        raise CheckpointError(f"numpy scalar of dtype {dtype!r} refused")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError("numpy scalar with malformed data")
    return np.frombuffer(data, dtype, count=1)[0]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError("tensor rebuilt from something that is not a storage")
    ints = lambda t: isinstance(t, tuple) and all(isinstance(i, int) and i >= 0 for i in t)
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and ints(tuple(size))
            and ints(tuple(stride)) and len(size) == len(stride)):
        raise CheckpointError(f"tensor with invalid layout: offset {storage_offset}, size {size}, stride {stride}")
    size, stride = tuple(size), tuple(stride)
    if len(size) > 8 or any(n >= 1 << 31 for n in size) or math.prod(size) > len(storage):
        # torch.save writes a parameter's own storage: it never holds more elements than that
        raise CheckpointError(f"tensor of size {size[:8]} is larger than its storage of {len(storage)} elements")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(storage):
        raise CheckpointError(f"tensor of size {size} (offset {storage_offset}, stride {stride}) reads past "
                              f"the end of its storage of {len(storage)} elements")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size, tuple(s * item for s in stride),
                                           writeable=False)
    return np.array(view)  # own, contiguous copy


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, np.ndarray):
        raise CheckpointError("parameter rebuilt from something that is not a tensor")
    return data


_CALLABLES: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("__builtin__", "set"): _set,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,   # numpy 1.x pickles
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x pickles
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------


# The opcodes of protocol-2 pickles as torch.save writes them (and a few harmless
# relatives of later protocols). Everything else is refused before it runs: the text
# opcodes of protocol 0 (INST/OBJ call classes), copyreg extensions, out-of-band
# buffers, and the opcodes with 8-byte lengths or unbounded integers (LONG4), whose
# lengths could size an allocation.
_ALLOWED_OPCODES = frozenset(
    "PROTO STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT "
    "BINUNICODE SHORT_BINUNICODE BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES "
    "EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST EMPTY_DICT DICT SETITEM SETITEMS "
    "GLOBAL STACK_GLOBAL REDUCE NEWOBJ BUILD BINPERSID BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET".split())


class _Dispatch(dict):
    """pickle's opcode table, reduced to _ALLOWED_OPCODES; any other opcode is refused."""

    def __missing__(self, code):
        name = _OPCODE_NAMES.get(code, f"0x{code:02x}")
        raise CheckpointError(f"pickle opcode {name} is not allowed in a QINCo checkpoint")


_OPCODE_NAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}
_DISPATCH = _Dispatch({code: fn for code, fn in pickle._Unpickler.dispatch.items()
                       if _OPCODE_NAMES.get(code) in _ALLOWED_OPCODES})


def _load_build(self):
    # BUILD sets the state of the object under it. Only the stand-ins of modules, numpy
    # dtypes and state dicts (torch sets their `_metadata`) take one, all fresh objects
    # of this load: BUILD on anything else (a function of the allow-list, a stand-in
    # class) could change it for every later load.
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, TorchModule):
        inst.__setstate__(state)
    elif isinstance(inst, np.dtype):
        # numpy's own state of a plain numeric dtype, and nothing else: numpy's
        # __setstate__ fails badly (SystemError) on some malformed ones
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)):
            raise CheckpointError(f"numpy dtype with a malformed state {str(state)[:80]}")
        inst.__setstate__(state)
    elif type(inst) is collections.OrderedDict and isinstance(state, dict) \
            and all(isinstance(k, str) for k in state):
        inst.__dict__.update(state)
    else:
        raise CheckpointError(f"pickle sets the state of a {type(inst).__name__}: not produced by torch.save")


_DISPATCH[pickle.BUILD[0]] = _load_build


class _SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its memo is a dict and it reads lengths from the data
    actually present: no field of the file sizes an allocation), with the opcode table
    above and every global through find_class's allow-list."""

    dispatch = _DISPATCH

    def __init__(self, data: bytes, load_storage: Callable, path: str):
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage
        self._path = path
        self._storage_dtypes = _storage_dtypes()

    def find_class(self, module, name):
        key = (module, name)
        if key in _MODULE_CLASSES:
            return _module_stub(module, name)
        if key in _CALLABLES:
            return _CALLABLES[key]
        if module == "torch" and name in self._storage_dtypes:
            return _StorageType(name, self._storage_dtypes[name])
        raise CheckpointError(f"{self._path}: refusing to load global '{module}.{name}': it is not on the "
                              "allow-list of what a QINCo checkpoint contains")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid  # location ('cpu', 'cuda:0', ...) is irrelevant here
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError(f"{self._path}: malformed storage reference {str(pid)[:80]}")
        return self._load_storage(key, stype.dtype, numel)


def sniff(path: str | os.PathLike) -> str:
    """What a file looks like: 'zip', 'legacy' (torch's pre-1.6 pickle format),
    'truncated' (starts like a zip but has no readable directory) or 'other'."""
    if zipfile.is_zipfile(path):
        return "zip"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        return "legacy"
    if head[:2] == b"PK":
        return "truncated"
    return "other"


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a .pt file")
    kind = sniff(path)
    if kind == "legacy":
        raise CheckpointError(f"{path}: legacy (non-zip) PyTorch format, re-save with torch>=1.6 "
                              "(torch.save(torch.load(f, weights_only=False), f))")
    if kind == "truncated":
        raise CheckpointError(f"{path}: truncated or corrupt zip archive (no central directory)")
    if kind == "other":
        raise CheckpointError(f"not a QINCo checkpoint: {path}: neither a zip archive nor a directory "
                              "(expected a .pt file or a qinco-jax model directory)")
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from None


def load_pt(path: str | os.PathLike) -> Any:
    """The object pickled in a `.pt` file, with modules as `TorchModule` records and
    tensors as numpy arrays. Raises CheckpointError for anything unsafe or malformed."""
    path = os.fspath(path)
    with _open_zip(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path}: zip archive without a data.pkl: not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        order = "little"
        if prefix + "byteorder" in names:
            order = _read(zf, prefix + "byteorder", path).decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byte order {order!r}")
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise CheckpointError(f"{path}: storage {key!r} is missing from the archive")
                raw = _read(zf, entry, path)
                dt = dtype.newbyteorder(">" if order == "big" else "<") if dtype.itemsize > 1 else dtype
                if numel < 0 or numel * dt.itemsize > len(raw):
                    raise CheckpointError(f"{path}: storage {key!r} holds {len(raw)} bytes, "
                                          f"{numel} x {dt.itemsize} expected")
                storages[key] = np.frombuffer(raw, dt, count=numel).astype(dtype)
            if storages[key].dtype != dtype:
                raise CheckpointError(f"{path}: storage {key!r} is used with two different types")
            return storages[key]

        data = _read(zf, pkl[0], path)
        try:
            return _SafeUnpickler(data, load_storage, path).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                IndexError, KeyError, struct.error, OverflowError, RecursionError, SystemError) as e:
            raise CheckpointError(f"{path}: corrupt pickle in data.pkl ({type(e).__name__}: {e})") from None


# What zipfile raises on damaged archives (RuntimeError: a flipped "encrypted" flag).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
               struct.error, OverflowError, IndexError, KeyError)


def read_extra_record(path: str | os.PathLike, key: str) -> bytes | None:
    """The bytes of an extra entry `write_pt` stored under `key`, or None if the
    archive has none (files written by torch, or by older versions)."""
    path = os.fspath(path)
    with _open_zip(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        entry = f"{pkl[0][: -len('data.pkl')]}extra/{key}" if pkl else None
        return _read(zf, entry, path) if entry in names else None


def _read(zf: zipfile.ZipFile, name: str, path: str) -> bytes:
    """An entry's bytes, after checking its sizes against the file (a damaged size field
    must not size an allocation); zipfile checks the entry's CRC-32 as it reads."""
    try:
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: entry {name!r} is compressed (method {info.compress_type}); "
                                  "torch.save stores entries uncompressed")
        if info.file_size != info.compress_size or info.file_size > os.path.getsize(path):
            raise CheckpointError(f"{path}: entry {name!r} claims {info.file_size} bytes, more than the "
                                  f"archive holds: truncated or corrupt")
        return zf.read(info)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read {name!r} from the archive, truncated or corrupt ({e})") \
            from None


# --------------------------------------------------------------------------------------
# Writer: a small pickle (protocol 2) emitter
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Global:
    """A `module.name` reference, emitted as a GLOBAL opcode (never imported here)."""

    module: str
    name: str


@dataclasses.dataclass(eq=False)
class Reduce:
    """`func(*args)`, then BUILD with `state` if given."""

    func: Global
    args: tuple
    state: Any = None


@dataclasses.dataclass(eq=False)
class NewObj:
    """`cls.__new__(cls)` then BUILD with `state`: how nn.Modules are pickled."""

    cls: Global
    state: dict


@dataclasses.dataclass(frozen=True)
class PersistentId:
    pid: tuple


class _Emitter:
    """Writes values as protocol-2 pickle opcodes. Objects (lists, dicts, modules) that
    appear twice are written once and referenced from the memo afterwards, so that
    `steps` and `_modules` share their modules after loading, as in torch's files."""

    def __init__(self):
        self.out = bytearray(pickle.PROTO + b"\x02")
        self.memo: dict[Any, int] = {}

    def _put(self, key):
        i = len(self.memo)
        self.memo[key] = i
        self.out += pickle.BINPUT + bytes([i]) if i < 256 else pickle.LONG_BINPUT + struct.pack("<I", i)

    def _get(self, key) -> bool:
        if key not in self.memo:
            return False
        i = self.memo[key]
        self.out += pickle.BINGET + bytes([i]) if i < 256 else pickle.LONG_BINGET + struct.pack("<I", i)
        return True

    def save(self, v):
        out = self.out
        if v is None:
            out += pickle.NONE
        elif v is True or v is False:
            out += pickle.NEWTRUE if v else pickle.NEWFALSE
        elif isinstance(v, int):
            if 0 <= v < 256:
                out += pickle.BININT1 + bytes([v])
            elif 0 <= v < 65536:
                out += pickle.BININT2 + struct.pack("<H", v)
            elif -(2**31) <= v < 2**31:
                out += pickle.BININT + struct.pack("<i", v)
            else:
                raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                out += pickle.LONG1 + bytes([len(raw)]) + raw
        elif isinstance(v, float):
            out += pickle.BINFLOAT + struct.pack(">d", v)
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw
        elif isinstance(v, bytes):
            # Protocol 2 has no bytes opcode: the standard encoding is _codecs.encode.
            self.save(Reduce(Global("_codecs", "encode"), (v.decode("latin1"), "latin1")))
        elif isinstance(v, tuple):
            if len(v) == 0:
                out += pickle.EMPTY_TUPLE
            elif len(v) <= 3:
                for x in v:
                    self.save(x)
                self.out += (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(v) - 1]
            else:
                out += pickle.MARK
                for x in v:
                    self.save(x)
                self.out += pickle.TUPLE
        elif isinstance(v, list):
            if self._get(id(v)):
                return
            out += pickle.EMPTY_LIST
            self._put(id(v))
            if v:
                self.out += pickle.MARK
                for x in v:
                    self.save(x)
                self.out += pickle.APPENDS
        elif isinstance(v, dict):
            if self._get(id(v)):
                return
            out += pickle.EMPTY_DICT
            self._put(id(v))
            if v:
                self.out += pickle.MARK
                for k, x in v.items():
                    self.save(k)
                    self.save(x)
                self.out += pickle.SETITEMS
        elif isinstance(v, Global):
            if self._get(v):
                return
            out += pickle.GLOBAL + f"{v.module}\n{v.name}\n".encode("ascii")
            self._put(v)
        elif isinstance(v, Reduce):
            if self._get(id(v)):
                return
            self.save(v.func)
            self.save(tuple(v.args))
            self.out += pickle.REDUCE
            self._put(id(v))
            if v.state is not None:
                self.save(v.state)
                self.out += pickle.BUILD
        elif isinstance(v, NewObj):
            if self._get(id(v)):
                return
            self.save(v.cls)
            self.out += pickle.EMPTY_TUPLE + pickle.NEWOBJ
            self._put(id(v))
            self.save(v.state)
            self.out += pickle.BUILD
        elif isinstance(v, PersistentId):
            self.save(v.pid)
            self.out += pickle.BINPERSID
        else:
            raise TypeError(f"cannot write a {type(v).__name__} into a torch pickle")

    def finish(self) -> bytes:
        return bytes(self.out + pickle.STOP)


class TorchWriter:
    """Builds the pickled description of torch modules and collects their storages."""

    def __init__(self):
        self.storages: list[np.ndarray] = []
        self._hooks = Global("collections", "OrderedDict")

    def ordered_dict(self) -> Reduce:
        return Reduce(self._hooks, ())

    def tensor(self, array: np.ndarray, requires_grad: bool = True):
        """A float32 tensor (stored contiguous, on 'cpu'), wrapped as an nn.Parameter."""
        a = np.ascontiguousarray(array, dtype="<f4")
        key = str(len(self.storages))
        self.storages.append(a)
        # torch's contiguous strides, in elements (numpy's are 0 for empty arrays; torch's are not)
        stride = tuple(int(np.prod(a.shape[i + 1:])) for i in range(a.ndim))
        pid = PersistentId(("storage", Global("torch", "FloatStorage"), key, "cpu", int(a.size)))
        t = Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                   (pid, 0, tuple(int(n) for n in a.shape), stride, False, self.ordered_dict()))
        return Reduce(Global("torch._utils", "_rebuild_parameter"), (t, requires_grad, self.ordered_dict()))

    def plain_tensor(self, array: np.ndarray) -> Reduce:
        """A plain contiguous tensor on 'cpu' (not a Parameter: what a state_dict holds),
        of the array's dtype (float32 or int64)."""
        storage = {np.dtype("<f4"): "FloatStorage", np.dtype("<i8"): "LongStorage"}
        a = np.ascontiguousarray(array)
        a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in storage:
            raise TypeError(f"plain_tensor writes float32 or int64 arrays, not {array.dtype}")
        key = str(len(self.storages))
        self.storages.append(a)
        stride = tuple(int(np.prod(a.shape[i + 1:])) for i in range(a.ndim))
        pid = PersistentId(("storage", Global("torch", storage[a.dtype]), key, "cpu", int(a.size)))
        return Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                      (pid, 0, tuple(int(n) for n in a.shape), stride, False, self.ordered_dict()))

    def module(self, cls: tuple[str, str], parameters: dict | None = None, modules: dict | None = None,
               **attributes) -> NewObj:
        """An nn.Module with torch's internal attributes, then the class's own ones."""
        state = {
            "training": False,
            "_parameters": dict(parameters or {}),
            "_buffers": {},
            "_non_persistent_buffers_set": Reduce(Global("__builtin__", "set"), ([],)),
        }
        for name in ("_backward_pre_hooks", "_backward_hooks"):
            state[name] = self.ordered_dict()
        state["_is_full_backward_hook"] = None
        for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                     "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
            state[name] = self.ordered_dict()
        state["_modules"] = dict(modules or {})
        state.update(attributes)
        return NewObj(Global(*cls), state)

    # Common torch.nn modules, with the attributes their constructors set.
    def linear(self, weight: np.ndarray, bias: np.ndarray | None = None) -> NewObj:
        out_f, in_f = weight.shape
        params = {"weight": self.tensor(weight), "bias": None if bias is None else self.tensor(bias)}
        return self.module(("torch.nn.modules.linear", "Linear"), params, in_features=int(in_f),
                           out_features=int(out_f))

    def embedding(self, weight: np.ndarray, frozen: bool = False) -> NewObj:
        n, dim = weight.shape
        return self.module(("torch.nn.modules.sparse", "Embedding"),
                           {"weight": self.tensor(weight, requires_grad=not frozen)},
                           num_embeddings=int(n), embedding_dim=int(dim), padding_idx=None, max_norm=None,
                           norm_type=2.0, scale_grad_by_freq=False, sparse=False)

    def relu(self) -> NewObj:
        return self.module(("torch.nn.modules.activation", "ReLU"), inplace=False)

    def sequential(self, *mods) -> NewObj:
        return self.module(("torch.nn.modules.container", "Sequential"),
                           modules={str(i): m for i, m in enumerate(mods)})

    @staticmethod
    def numpy_float32(value: float) -> Reduce:
        """A numpy float32 scalar, pickled under numpy 1.x's path (loads under 1.x and 2.x)."""
        dtype = Reduce(Global("numpy", "dtype"), ("f4", False, True),
                       state=(3, "<", None, None, None, -1, -1, 0))
        return Reduce(Global("numpy.core.multiarray", "scalar"), (dtype, np.float32(value).tobytes()))


def write_pt(path: str | os.PathLike, writer: TorchWriter, root, archive_name: str | None = None,
             extra_records: dict[str, bytes] | None = None) -> None:
    """Write `root` (built with `writer`) as a torch zip checkpoint at `path` (not atomic:
    callers write to a temporary path and rename). extra_records: more entries of the
    archive, `<archive>/extra/<name>` (torch.load reads only the entries it knows and
    ignores these; `read_extra_record` reads one back)."""
    path = os.fspath(path)
    emitter = _Emitter()
    emitter.save(root)
    pkl = emitter.finish()
    name = archive_name or os.path.splitext(os.path.basename(path))[0] or "archive"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    records += [(f"data/{i}", a.tobytes()) for i, a in enumerate(writer.storages)]
    digest = hashlib.sha1(b"".join(r for _, r in records)).hexdigest()  # data.pkl included
    records += [("version", b"3\n"), (".data/serialization_id", str(int(digest, 16))[:40].encode())]
    records += [(f"extra/{key}", bytes(data)) for key, data in (extra_records or {}).items()]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for rel, data in records:
            _write_aligned(zf, f, f"{name}/{rel}", data)


def _write_aligned(zf: zipfile.ZipFile, f, arcname: str, data: bytes, alignment: int = 64) -> None:
    """Add a stored entry whose data starts on an `alignment` boundary, padding the
    local header's extra field as torch does (lets torch memory-map the tensors)."""
    info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = f.tell() + 30 + len(arcname.encode("utf-8"))
    pad = (-(header_end + 4)) % alignment
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data)
