"""Pickle-free, atomic, validated model folders.

A folder holds ``metadata.json`` and the files it names. Parameter files are
named by the sha256 of their bytes, written to a temporary file, fsynced and
renamed; ``metadata.json`` is replaced last, by rename. A crash at any moment
leaves ``metadata.json`` pointing at complete files: the earlier save, or the
new one. ``metadata.json`` carries the sha256 of its own content (canonical
JSON, so key order and spacing do not matter; folders written before it was
added have none). Loading checks the format tag, the version and every checksum.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from flax import serialization

from . import lock
from ._version import FORMAT_VERSION, __version__
from .errors import ModelFormatError

FORMAT_TAG = "jaxscanvi-model"
# Oldest model format this release reads; FORMAT_VERSION is the newest (and the
# one it writes). tests/fixtures/format_v1 holds a frozen format-1 save.
OLDEST_FORMAT_VERSION = 1
METADATA = "metadata.json"
CHECKSUM_KEY = "metadata_sha256"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise OSError(
                e.errno,
                f"{e.strerror} while writing {str(path)!r} "
                f"({len(data)} bytes); the folder's previous version is intact. "
                "Fix: free space on that disk (or pass a folder on another one) "
                "and save again",
            ) from e
        raise
    _fsync_dir(path.parent)


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (one seam for tests of a full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_folder(
    dir_path,
    metadata: dict[str, Any],
    blobs: dict[str, bytes],
    *,
    overwrite: bool,
    extra_files: dict[str, Path] | None = None,
) -> None:
    """Write named byte blobs and metadata atomically into ``dir_path``.

    ``extra_files`` are already-written files (e.g. an .h5ad) to move in under
    a content-addressed name. The folder is locked meanwhile (`lock`).
    """
    with lock.locked(dir_path, "save"):
        _write_folder(Path(dir_path), metadata, blobs, overwrite=overwrite, extra_files=extra_files)


def _write_folder(d: Path, metadata, blobs, *, overwrite: bool, extra_files) -> None:
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} exists and is not a folder")
    if d.exists() and (d / METADATA).exists() and not overwrite:
        raise FileExistsError(f"{d} already holds a saved model; pass overwrite=True to replace it")
    d.mkdir(parents=True, exist_ok=True)
    old_files = set(_listed_files(d))
    files, new = {}, []
    try:
        for name, data in blobs.items():
            digest = sha256(data)
            fname = f"{name}-{digest[:16]}.msgpack"
            if not (d / fname).exists():
                atomic_write_bytes(d / fname, data)
                new.append(fname)
            files[name] = {"file": fname, "sha256": digest}
        for name, src in (extra_files or {}).items():
            digest = _file_sha256(src)
            fname = f"{name}-{digest[:16]}{''.join(Path(src).suffixes)}"
            os.replace(src, d / fname)
            new.append(fname)
            files[name] = {"file": fname, "sha256": digest}
        meta = sign(
            {
                "format": FORMAT_TAG,
                "format_version": FORMAT_VERSION,
                "jaxscanvi_version": __version__,
                **metadata,
                "files": files,
            }
        )
        atomic_write_bytes(d / METADATA, json.dumps(meta, indent=1).encode())
    except BaseException:  # (a full disk, say) the old metadata names the old files:
        for f in set(new) - old_files:  # leave the folder as it was
            with contextlib.suppress(OSError):
                os.unlink(d / f)
        raise
    keep = {f["file"] for f in files.values()}
    for f in old_files - keep:
        with contextlib.suppress(OSError):
            os.unlink(d / f)


def metadata_checksum(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` without its checksum, as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    text = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"))
    return sha256(text.encode())


def sign(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its checksum (re-sign after an intended edit)."""
    return {**meta, CHECKSUM_KEY: metadata_checksum(meta)}


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(d: Path) -> list[str]:
    try:
        meta = json.loads((d / METADATA).read_text())
        return [f["file"] for f in meta.get("files", {}).values()]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def read_metadata(dir_path) -> dict[str, Any]:
    d = Path(dir_path)
    if not d.exists():
        raise FileNotFoundError(
            f"no model folder at {str(d)!r}: the path does not exist. "
            "Fix: pass the folder given to model.save(...)"
        )
    if not d.is_dir():
        raise ModelFormatError(
            f"{str(d)!r} is a file, not a model folder. Fix: pass the "
            "folder given to model.save(...)"
        )
    if not (d / METADATA).exists():
        hint = (
            " It looks like a scvi-tools model (model.pt): open it with SCVI.load or SCANVI.load."
            if (d / "model.pt").exists()
            else ""
        )
        raise ModelFormatError(
            f"{str(d)!r} is not a jaxscanvi model folder: it has no {METADATA}.{hint}"
        )
    try:
        meta = json.loads((d / METADATA).read_text())
    except (ValueError, RecursionError, OSError) as e:  # (UnicodeDecodeError: ValueError)
        raise ModelFormatError(
            f"{str(d / METADATA)!r} is damaged (not valid JSON: "
            f"{str(e)[:200]}). Fix: save the model again"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_TAG:
        raise ModelFormatError(
            f"{str(d)!r} is not a jaxscanvi model folder (format tag "
            f"{meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    version = meta.get("format_version")
    writer = meta.get("jaxscanvi_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFormatError(
            f"{str(d)!r} has no valid model format version (model format {version!r} in "
            f"{METADATA}, written by jaxscanvi {writer}); this jaxscanvi {__version__} "
            f"reads formats {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}, so the folder is "
            "damaged or was not written by a jaxscanvi release. Fix: restore the folder's "
            f"original {METADATA}, or save the model again with jaxscanvi"
        )
    if version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{str(d)!r} was written with model format {version!r} (jaxscanvi "
            f"{writer}); this jaxscanvi {__version__} reads formats "
            f"up to {FORMAT_VERSION}. Fix: upgrade jaxscanvi (pip install -U jaxscanvi)"
        )
    if version < OLDEST_FORMAT_VERSION:
        pin = f" (pip install 'jaxscanvi=={writer}')" if isinstance(writer, str) else ""
        raise ModelFormatError(
            f"{str(d)!r} was written with model format {version!r} (jaxscanvi {writer}), "
            f"an older format that this jaxscanvi {__version__} cannot read (it reads "
            f"formats {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}). Fix: load it with the "
            f"jaxscanvi release that wrote it{pin} and use "
            "it from there, or train and save the model again with this release"
        )
    if CHECKSUM_KEY in meta and meta[CHECKSUM_KEY] != metadata_checksum(meta):
        raise ModelFormatError(
            f"{str(d / METADATA)!r} does not match its checksum ({CHECKSUM_KEY}): the file "
            "is damaged or was edited. Fix: restore the folder from a copy, or save the "
            "model again"
        )
    _check_files(d, meta.get("files"))
    return meta


def _check_files(d: Path, files) -> None:
    """Each listed file is a plain name in the folder with a sha256: nothing else is read."""
    ok = isinstance(files, dict) and all(
        isinstance(k, str)
        and isinstance(v, dict)
        and isinstance(v.get("file"), str)
        and isinstance(v.get("sha256"), str)
        and len(v["sha256"]) == 64
        and _PLAIN_NAME.fullmatch(v["file"]) is not None
        for k, v in files.items()
    )
    if not ok:
        raise ModelFormatError(
            f"{str(d / METADATA)!r} lists its files wrongly ('files' "
            f"must map names to {{'file': <name in the folder>, 'sha256':"
            " ...}}); the folder is damaged. Fix: save the model again"
        )


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def read_blob(dir_path, meta: dict[str, Any], name: str) -> bytes:
    entry = meta.get("files", {}).get(name)
    if entry is None:
        raise ModelFormatError(
            f"{str(dir_path)!r}: metadata names no {name!r} file; the "
            "folder is damaged. Fix: save the model again"
        )
    path = Path(dir_path) / entry["file"]
    try:
        data = path.read_bytes()
    except OSError:
        raise ModelFormatError(
            f"{str(path)!r} is missing; the folder is damaged. Fix: save the model again"
        ) from None
    if sha256(data) != entry["sha256"]:
        raise ModelFormatError(
            f"{str(path)!r} does not match its checksum; the file is "
            "damaged. Fix: save the model again"
        )
    return data


def file_path(dir_path, meta: dict[str, Any], name: str) -> Path | None:
    entry = meta.get("files", {}).get(name)
    if entry is None:
        return None
    path = Path(dir_path) / entry["file"]
    if not path.exists() or _file_sha256(path) != entry["sha256"]:
        raise ModelFormatError(f"{str(path)!r} is missing or damaged. Fix: save again")
    return path


def to_bytes(tree) -> bytes:
    return serialization.msgpack_serialize(serialization.to_state_dict(tree))


def from_bytes(template, data: bytes, what: str):
    """Restore ``template``'s structure from bytes, checking every leaf's shape."""
    import jax
    import numpy as np

    try:
        raw = serialization.msgpack_restore(data)
        if not isinstance(raw, dict):  # what to_bytes writes restores as a dict
            raise TypeError(f"a {type(raw).__name__}, not a state dict")
        tree = serialization.from_state_dict(template, raw)
    except Exception as e:  # noqa: BLE001 - msgpack or structure mismatch: one error
        raise ModelFormatError(
            f"the saved {what} do not fit this model's structure "
            f"({type(e).__name__}: {str(e)[:200]}). Fix: save them "
            "again"
        ) from None
    bad = []

    def check(path, t, v):
        dt, dv = (np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) for x in (t, v))
        if np.shape(t) != np.shape(v) or dt != dv:
            bad.append(f"{jax.tree_util.keystr(path)}: {np.shape(v)} {dv} vs {np.shape(t)} {dt}")
        return v

    tree = jax.tree_util.tree_map_with_path(check, template, tree)
    if bad:
        raise ModelFormatError(
            f"saved {what} have wrong shapes or types: {bad[:5]}. Fix: save them again"
        )
    return tree
