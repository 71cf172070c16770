"""torch's file format read and written without torch, as numpy arrays.

A ``torch.save`` file is a zip: ``<archive>/data.pkl`` (a pickle whose
tensors point, by persistent id, at storages), one ``<archive>/data/<key>``
entry of raw bytes per storage, and small records (``byteorder``,
``version``). Reading uses a restricted unpickler: ``find_class`` hands out
only the few names below, each mapped to our own safe rebuild, and refuses
everything else, so a crafted file cannot run code. pandas objects (the
training history scvi-tools pickles) come back as inert `Opaque` records:
their classes are never imported or called.
"""

from __future__ import annotations

import builtins
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import ModelFormatError

MAX_PICKLE_BYTES = 256 * 2**20  # a model's data.pkl is kilobytes; more is not a model

# storage class -> numpy dtype (bfloat16 is read as its top 16 bits of a float32)
_STORAGES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_ITEMSIZE = {"bf16": 2}
_SCALARS = (str, bytes, int, float, bool, type(None), np.generic)


class Opaque:
    """An object of a whitelisted pandas class, recorded but never built."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state


def _opaque(name: str) -> type:
    return type(name, (Opaque,), {})


_PANDAS = {
    (m, n): _opaque(n)
    for m, n in [
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.series", "Series"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.managers", "SingleBlockManager"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas.core.internals.blocks", "Block"),
        ("pandas.core.internals.blocks", "FloatBlock"),
        ("pandas.core.internals.blocks", "IntBlock"),
        ("pandas.core.internals.blocks", "ObjectBlock"),
        ("pandas.core.internals.blocks", "NumericBlock"),
        ("pandas.core.internals.blocks", "make_block"),  # (older pandas' names)
        ("pandas._libs.internals", "BlockPlacement"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.indexes.numeric", "Int64Index"),
        ("pandas.core.indexes.numeric", "Float64Index"),
    ]
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _SafeArray(np.ndarray):
    """An ndarray whose pickled state is checked before numpy sees it."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ModelFormatError(f"bad numpy array state in the pickle: {type(state)}")
        shape, dtype, data = state[-4], state[-3], state[-1]
        if not (
            isinstance(shape, tuple)
            and all(isinstance(s, int) and s >= 0 for s in shape)
            and isinstance(dtype, np.dtype)
        ):
            raise ModelFormatError("bad numpy array shape or dtype in the pickle")
        n = math.prod(shape)
        if dtype.hasobject:
            # object arrays only of plain values (category names, not objects)
            if not (
                isinstance(data, list)
                and len(data) == n
                and all(isinstance(v, _SCALARS) for v in data)
            ):
                raise ModelFormatError(
                    "a numpy object array in the pickle holds something "
                    "other than strings or numbers"
                )
        elif not (isinstance(data, bytes) and len(data) == n * dtype.itemsize):
            raise ModelFormatError("a numpy array in the pickle has the wrong number of bytes")
        super().__setstate__(state)


class _NDArrayName:
    """What ``numpy.ndarray`` resolves to: a name `_np_reconstruct` accepts, not the
    class itself (calling it would make arrays around `_SafeArray`'s checks)."""


_NDARRAY = _NDArrayName()


def _np_reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or shape != (0,):
        raise ModelFormatError(f"numpy reconstruction of {cls!r} is not allowed")
    return np.ndarray.__new__(_SafeArray, (0,), np.uint8)


def _np_scalar(dtype, data=None):
    if (
        not isinstance(dtype, np.dtype)
        or dtype.hasobject
        or not isinstance(data, bytes)
        or len(data) != dtype.itemsize
    ):
        raise ModelFormatError("bad numpy scalar in the pickle")
    return np.frombuffer(data, dtype)[0]


def _latin1(text="", encoding="utf-8"):
    # protocol 2 spells bytes as _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ModelFormatError("_codecs.encode is allowed only as latin1 bytes")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise ModelFormatError("bytes(...) with arguments is not allowed in the pickle")
    return b""


def _defaultdict(factory=None):
    return {}  # the default factory is never needed for saved values


def _rebuild_tensor(
    storage, offset, size, stride, requires_grad=None, hooks=None, metadata=None
):  # (torch's positional signature)
    if (
        not isinstance(storage, np.ndarray)
        or not isinstance(offset, int)
        or not isinstance(size, tuple)
        or not isinstance(stride, tuple)
        or len(size) != len(stride)
        or not all(isinstance(v, int) and v >= 0 for v in (*size, *stride, offset))
    ):
        raise ModelFormatError("bad tensor shape or stride in the torch file")
    if hooks:
        raise ModelFormatError("the torch file has tensors with backward hooks")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise ModelFormatError("a tensor in the torch file reaches past its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, hooks=None):
    if not isinstance(data, np.ndarray) or hooks:
        raise ModelFormatError("bad parameter in the torch file")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("_codecs", "encode"): _latin1,
    **{(b, "bytes"): _empty_bytes for b in ("builtins", "__builtin__")},
    **{
        (b, n): getattr(builtins, n)
        for b in ("builtins", "__builtin__")
        for n in ("dict", "list", "tuple", "set", "frozenset", "slice")
    },
    **{("torch", n): _StorageType(n) for n in _STORAGES},
    **_PANDAS,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages=None, where: str = "file"):
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._where = where

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise ModelFormatError(
                f"{self._where} refers to {module}.{name}, which a model file has no need "
                "of; it is not loaded (it could run code). Fix: load only model files "
                "written by scvi-tools or jaxscanvi"
            )
        return found

    def persistent_load(self, pid):
        if self._storages is None:
            raise ModelFormatError(f"{self._where}: unexpected storage reference")
        return self._storages(pid)


def _clean(obj, seen=None):
    """Plain containers and ndarrays (pandas records kept as `Opaque`)."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _SafeArray):
        out = np.asarray(obj).view(np.ndarray)
        out = (
            out.astype(str)
            if out.dtype.hasobject and all(isinstance(v, str) for v in out.ravel().tolist())
            else out
        )
    elif isinstance(obj, OrderedDict):
        out = OrderedDict()
        seen[id(obj)] = out
        out.update((k, _clean(v, seen)) for k, v in obj.items())
    elif isinstance(obj, dict):
        out = {}
        seen[id(obj)] = out
        out.update((_clean(k, seen), _clean(v, seen)) for k, v in obj.items())
    elif isinstance(obj, list):
        out = []
        seen[id(obj)] = out
        out.extend(_clean(v, seen) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_clean(v, seen) for v in obj)
    else:
        out = obj
    seen[id(obj)] = out
    return out


def _unpickle(data: bytes, storages, where: str):
    try:
        return _clean(_Unpickler(data, storages, where).load())
    except ModelFormatError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
        struct.error,
    ) as e:
        raise ModelFormatError(
            f"{where} is damaged or not a model file ({e}). Fix: save the model again"
        ) from None


def load_pickle(path) -> object:
    """A plain pickle (scvi-tools < 0.15's ``attr.pkl``), through the same whitelist."""
    path = Path(path)
    if path.stat().st_size > MAX_PICKLE_BYTES:
        raise ModelFormatError(
            f"{str(path)!r} is {path.stat().st_size} bytes; too large for a model's attributes"
        )
    return _unpickle(path.read_bytes(), None, repr(str(path)))


def load(path) -> object:
    """What ``torch.save`` wrote to ``path``, tensors as numpy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ModelFormatError(
            f"{str(path)!r} is not a scvi-tools (torch) model file: it is not in torch's "
            "zip format (torch >= 1.6 writes it; older torch wrote one jaxscanvi does not "
            "read). Fix: pass a folder scvi-tools saved, or re-save an old file with a "
            "recent torch: torch.save(torch.load(path), path)"
        )
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ModelFormatError(
                f"{str(path)!r} is a zip but not a torch file (no <archive>/data.pkl)"
            )
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in infos:
            order = z.read(prefix + "byteorder").strip()
            if order not in (b"little", b"big"):
                raise ModelFormatError(f"{str(path)!r}: unknown byteorder {order!r}")
            little = order == b"little"
        if infos[pkl[0]].file_size > MAX_PICKLE_BYTES:
            raise ModelFormatError(f"{str(path)!r}: data.pkl is too large for a model")
        cache: dict = {}

        def storage(pid):
            if not (
                isinstance(pid, tuple)
                and len(pid) == 5
                and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str)
                and isinstance(pid[4], int)
                and pid[4] >= 0
            ):
                raise ModelFormatError(f"{str(path)!r}: bad storage reference {pid!r:.80}")
            key = pid[2]
            if key not in cache:
                cache[key] = _read_storage(
                    z, infos, prefix + "data/" + key, pid[1].name, pid[4], "<" if little else ">"
                )
            return cache[key]

        return _unpickle(z.read(pkl[0]), storage, repr(str(path)))


def _read_storage(
    z, infos, name: str, kind: str, numel: int, order: Literal["<", ">"]
) -> np.ndarray:
    code = _STORAGES[kind]
    size = numel * _ITEMSIZE.get(code, np.dtype(code).itemsize)
    info = infos.get(name)
    if info is None or info.file_size != size:  # checked before anything is read
        raise ModelFormatError(
            f"torch storage {name!r} is missing or has "
            f"{getattr(info, 'file_size', 0)} bytes, not {size}"
        )
    if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses: no zip bombs
        raise ModelFormatError(
            f"torch storage {name!r} is compressed; torch writes "
            "storages uncompressed. Fix: save the model again"
        )
    raw = z.read(name)
    if code == "bf16":
        top = np.frombuffer(raw, order + "u2").astype(np.uint32) << 16
        return top.view(np.float32)
    return np.frombuffer(raw, np.dtype(code).newbyteorder(order)).astype(np.dtype(code))


# ------------------------------------------------------------------ writing
_DTYPE_STORAGE = {np.dtype(v): k for k, v in _STORAGES.items() if v != "bf16"}


class Tensor:
    """Marks a numpy array to be written as a torch tensor."""

    def __init__(self, array):
        self.array = np.asarray(array, order="C")  # (ascontiguousarray makes 0-d 1-d)
        if self.array.dtype not in _DTYPE_STORAGE:
            raise TypeError(f"no torch storage for dtype {self.array.dtype}")


class _Global:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # (pickle's save_reduce wants a callable; never called)
        raise TypeError(f"{self.module}.{self.name} is resolved by torch when it loads")


class _Pickler(pickle._Pickler):
    """Writes torch's tensor and storage references without importing torch."""

    # the pure-Python pickler's internals this class drives (typeshed declares
    # only pickle's public API)
    write: Callable[[bytes], object]
    save_reduce: Callable[..., None]

    def __init__(self, file, storages: list):
        super().__init__(file, protocol=2)
        self._storages = storages

    def save(self, obj, save_persistent_id=True):  # noqa: FBT002 (pickle's signature)
        if isinstance(obj, _Global):  # a name torch resolves when it loads the file
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        if isinstance(obj, Tensor):
            a = obj.array
            key = str(len(self._storages))
            self._storages.append(a)
            ref = _StorageRef(key, _DTYPE_STORAGE[a.dtype], a.size)
            stride = tuple(s // a.itemsize for s in a.strides) if a.size else (1,) * a.ndim
            self.save_reduce(
                _Global("torch._utils", "_rebuild_tensor_v2"),
                (ref, 0, tuple(a.shape), stride, False, OrderedDict()),
                obj=obj,
            )
            return
        super().save(obj, save_persistent_id)  # pyright: ignore[reportAttributeAccessIssue]  # as above

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _Global("torch", obj.kind), obj.key, "cpu", obj.numel)
        return None


class _StorageRef:
    def __init__(self, key: str, kind: str, numel: int):
        self.key, self.kind, self.numel = key, kind, numel


def save(obj, path, archive: str = "archive") -> None:
    """Write ``obj`` as ``torch.save`` would (`Tensor`-marked arrays become tensors)."""
    buf = io.BytesIO()
    storages: list = []
    _Pickler(buf, storages).dump(obj)
    records = [
        ("data.pkl", buf.getvalue()),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
    ]
    records += [
        (f"data/{i}", a.astype(a.dtype.newbyteorder("<")).tobytes()) for i, a in enumerate(storages)
    ]
    records += [("version", b"3\n")]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            if name.startswith("data/"):  # storages start on 64-byte boundaries, as torch's
                start = f.tell() + 30 + len(info.filename.encode()) + 4
                pad = -start % 64
                info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)
