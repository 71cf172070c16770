"""Traced and lowered programs on disk (`jax.export`), so a warm process skips
tracing and lowering as JAX's persistent cache lets it skip XLA.

An entry is one file: a magic line, the SHA-256 of (key text + payload), the
key text's length, the key text, then the payload (``Exported.serialize()``).
It is trusted only when the magic, the lengths, the digest and the key text
all match what this process expects; anything else (a damaged, truncated,
foreign or stale file) is ignored and rebuilt, and `jax.export.deserialize`
never sees bytes that failed the check. The key text names the caller's key,
the argument shapes and dtypes, the backend and kernel choice, and the
versions of JAX, jaxlib, jaxscanvi and a digest of jaxscanvi's sources, so a
changed program can never match an old entry. An entry is data: a
serialized StableHLO module with its calling convention, never Python code.

The folder sits beside JAX's persistent cache (``<that folder>_exported``)
and is off when that cache is off. JAX serializes with the ``flatbuffers``
package, an optional dependency here (extra ``fast-start``); without it
every program is plain ``jax.jit``, as before.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib.version
import numpy as np

MAGIC = b"jaxscanvi-exported 1\n"
_DIGEST = 32


def available() -> bool:
    """Whether JAX can serialize exported programs: that needs the optional
    ``flatbuffers`` package (``pip install 'jaxscanvi[fast-start]'``)."""
    return importlib.util.find_spec("flatbuffers") is not None


def folder() -> Path | None:
    """Where entries go: beside JAX's persistent cache; None when it is off
    (or serialization is unavailable)."""
    return entries_folder() if available() else None


def entries_folder() -> Path | None:
    """``<JAX's persistent cache folder>_exported``; None when that cache is off.
    Entries that need no serializer (`model._plan_store`) go here too."""
    # jax.config's flags are attributes set at run time: pyright does not see them
    jax_dir = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    if not jax_dir:
        return None
    p = Path(jax_dir)
    return p.with_name(p.name + "_exported")


_source_digest: str | None = None


def source_digest() -> str:
    """SHA-256 over jaxscanvi's own sources: an edited kernel is a new key."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def _describe(tree) -> Any:
    """A JSON-like description of an output tree of dicts, lists, tuples and
    arrays (None for anything else: such outputs are not exported)."""
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        inner = {k: _describe(v) for k, v in sorted(tree.items())}
        return None if any(v is None for v in inner.values()) else ("d", inner)
    if type(tree) in (list, tuple):
        inner = [_describe(v) for v in tree]
        return None if any(v is None for v in inner) else (type(tree).__name__, inner)
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return ("x",)
    return None


def _rebuild(desc, leaves):
    kind = desc[0]
    if kind == "x":
        return next(leaves)
    if kind == "d":
        return {k: _rebuild(v, leaves) for k, v in desc[1].items()}
    items = [_rebuild(v, leaves) for v in desc[1]]
    return items if kind == "list" else tuple(items)


def key_text(key, avals, platform: str) -> str:
    from . import backend
    from ._version import __version__

    return repr(
        {
            "key": key,
            "args": avals,
            "platform": platform,
            "numerics": backend.current(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.version.__version__,
            "jaxscanvi": __version__,
            "sources": source_digest(),
            "x64": bool(jax.config.jax_enable_x64),  # pyright: ignore[reportAttributeAccessIssue]  # as in folder()
        }
    )


def pack(text: str, payload: bytes) -> bytes:
    t = text.encode()
    digest = hashlib.sha256(t + payload).digest()
    return MAGIC + digest + len(t).to_bytes(8, "little") + t + payload


def unpack(blob: bytes, text: str) -> bytes | None:
    """The payload, if ``blob`` is an intact entry for exactly ``text``; else None."""
    t = text.encode()
    head = len(MAGIC) + _DIGEST + 8
    if len(blob) < head or not blob.startswith(MAGIC):
        return None
    digest = blob[len(MAGIC) : len(MAGIC) + _DIGEST]
    n = int.from_bytes(blob[head - 8 : head], "little")
    if n != len(t) or blob[head : head + n] != t:
        return None
    payload = blob[head + n :]
    if hashlib.sha256(t + payload).digest() != digest:
        return None
    return payload


def _write(path: Path, blob: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)  # readers see the old file or the new one, whole
    except OSError:  # a read-only or full cache only costs the next process a trace
        pass


class ExportedCall:
    """A program for one argument signature: checks each call's arguments
    against it, then runs the (deserialized) exported program under jit."""

    def __init__(self, in_tree, avals, run: Callable, out_desc, source: str):
        self.in_tree, self.avals, self._run, self._out = in_tree, avals, run, out_desc
        self.source = source  # "disk", "exported" (built now) or "jit" (not exportable)

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        got = tuple((tuple(np.shape(x)), str(jax.numpy.result_type(x))) for x in leaves)
        if tree != self.in_tree or got != self.avals:
            raise TypeError(
                f"arguments {tree} {got} do not match the exported program's "
                f"{self.in_tree} {self.avals}"
            )
        if self._out is None:  # plain jit of the original function
            return self._run(*args)
        # its outputs are committed to their device (JAX's rule for exported
        # calls): committing every input too keeps one program for both
        leaves = [_committed(x) for x in leaves]
        return _rebuild(self._out, iter(self._run(*leaves)))


def _committed(x):
    if isinstance(x, jax.Array) and not x.committed and len(x.devices()) == 1:
        return jax.device_put(x, next(iter(x.devices())))  # the same buffer, no copy
    return x


class CarryProgram:
    """``fn(carry, *rest) -> (carry, out)`` through `exported`, once per argument
    signature. The carry's structure (any pytree: entries hold only dicts,
    lists and tuples) comes back from the argument's, as a scan keeps it."""

    def __init__(self, key, fn: Callable):
        self._key, self._programs = key, {}

        def flat(carry, *rest):
            new, out = fn(carry, *rest)
            return jax.tree_util.tree_leaves(new), out

        flat.__name__ = getattr(fn, "__name__", "flat")  # jit names its program so
        self._flat = flat

    def __call__(self, carry, *rest):
        args = (carry, *rest)
        leaves, tree = jax.tree_util.tree_flatten(args)
        sig = (tree, tuple((np.shape(x), str(jax.numpy.result_type(x))) for x in leaves))
        if sig not in self._programs:
            self._programs[sig] = exported(self._key, self._flat, *args)
        new, out = self._programs[sig](*args)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(carry), new), out


def exported(
    key, fn: Callable, *example_args, compiler_options: dict | None = None
) -> ExportedCall:
    """``fn`` for arguments shaped like ``example_args``, traced and lowered at
    most once across processes.

    ``key`` must name everything about ``fn`` that its arguments do not (its
    identity, the model configuration, static options) in a text that is the
    same in every process: its ``repr`` goes into the entry's key. Argument
    shapes and dtypes, the backend, the kernel choice and the versions are
    added here. ``fn`` takes pytrees of arrays and returns dicts, lists and
    tuples of arrays. The result checks that each call's arguments have the
    example's structure, shapes and dtypes (TypeError otherwise). Where the
    cache is off, ``fn`` returns another kind of tree, or JAX cannot export
    ``fn`` (host callbacks, say), it is plain ``jax.jit(fn)``.
    ``compiler_options`` go to XLA as ``jax.jit``'s do. Unlike plain jit's,
    an exported program's outputs are committed to their device: a jitted
    function fed with them and, on another call, with uncommitted arrays
    compiles twice (copy them through the host, or keep their origin alike).
    The result commits its own inputs, so it runs one program for either.
    """
    leaves, in_tree = jax.tree_util.tree_flatten(example_args)
    avals = tuple((tuple(np.shape(x)), str(jax.numpy.result_type(x))) for x in leaves)
    where = folder()
    opts = dict(compiler_options or {})
    plain = ExportedCall(in_tree, avals, jax.jit(fn, compiler_options=opts or None), None, "jit")
    if where is None:
        return plain
    platform = jax.default_backend()
    text = key_text((key, sorted(opts.items()), repr(in_tree)), avals, platform)
    if " at 0x" in text:  # an address differs in every process: no stable key
        return plain
    path = where / (hashlib.sha256(text.encode()).hexdigest() + ".jxe")
    try:
        blob = path.read_bytes()
    except OSError:
        blob = b""
    payload, source = unpack(blob, text), "disk"
    if payload is None:
        built = _export(fn, in_tree, leaves)
        if built is None:
            return plain
        payload, source = built, "exported"
        _write(path, pack(text, payload))
    # only a payload that passed the digest gets here
    n = int.from_bytes(payload[:8], "little")
    out_desc = ast.literal_eval(payload[8 : 8 + n].decode())  # literals only, never code
    exp = jax.export.deserialize(bytearray(payload[8 + n :]))
    return ExportedCall(
        in_tree, avals, jax.jit(exp.call, compiler_options=opts or None), out_desc, source
    )


def _export(fn, in_tree, leaves) -> bytes | None:
    desc: list = []

    def flat(*xs):
        out = fn(*jax.tree_util.tree_unflatten(in_tree, list(xs)))
        desc.append(_describe(out))
        return jax.tree_util.tree_leaves(out)

    specs = [jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in leaves]
    try:
        exp = jax.export.export(jax.jit(flat))(*specs)
    except Exception:  # noqa: BLE001 (anything JAX cannot export runs as plain jit)
        return None
    if not desc or desc[0] is None:
        return None
    # the output description travels in the payload, beside the module
    d = repr(desc[0]).encode()
    return len(d).to_bytes(8, "little") + d + bytes(exp.serialize())
