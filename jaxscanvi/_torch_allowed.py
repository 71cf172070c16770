"""The names a torch file's pickle may refer to, each mapped to a checked rebuild.

`torchfile`'s unpickler resolves every global through `_ALLOWED` and
nothing else; kept apart so that the list can be read (and audited) on its own.
"""

from __future__ import annotations

import builtins
import math
from collections import OrderedDict

import numpy as np

from .errors import ModelFormatError

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
