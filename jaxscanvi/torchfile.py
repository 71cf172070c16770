"""torch's file format read and written without torch, as numpy arrays.

A ``torch.save`` file is a zip: ``<archive>/data.pkl`` (a pickle whose
tensors point, by persistent id, at storages), one ``<archive>/data/<key>``
entry of raw bytes per storage, and small records (``byteorder``,
``version``). Reading uses a restricted unpickler: ``find_class`` hands out
only the few names in `_torch_allowed`, each mapped to our own safe rebuild,
and refuses everything else, so a crafted file cannot run code. pandas
objects (the training history scvi-tools pickles) come back as inert `Opaque`
records: their classes are never imported or called.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from ._torch_allowed import _ALLOWED, _ITEMSIZE, _STORAGES, _SafeArray, _StorageType
from ._torch_allowed import Opaque as Opaque  # re-exported: what pandas records load as
from .errors import ModelFormatError

MAX_PICKLE_BYTES = 256 * 2**20  # a model's data.pkl is kilobytes; more is not a model


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
