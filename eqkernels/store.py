"""Model and kernel files: HDF5 datasets plus JSON metadata, with a checksum. Nothing executable.

Layout of a file:
    attrs: format = "eqkernels", format_version (int), kind ("histology-model", "molecule-model",
           "kernel", "ensemble", ...), meta (JSON text), checksum (sha256 hex)
    datasets: one per named array, at the root

The checksum covers the metadata and every array (name, dtype, shape, bytes), so a truncated or
edited file is refused. Files are written to a temporary name and renamed, so an interrupted
write never leaves a half-written model behind.

Compatibility: a reader accepts every `format_version` up to its own; a file from a newer
eqkernels is refused with a clear message. Metadata records the library versions that wrote it.

Versions of a file kind's own fields: every kind stores one key, meta["version"] (`save(...,
version=)`, checked by `check_version`). Files written before had "schema" (ensembles, histology
models) or "model_version" (molecule and tensor models); `load` reads either as "version", and a
caller that still passes an old key to `save` has it written as "version".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from eqkernels.errors import ModelFileError

FORMAT = "eqkernels"
FORMAT_VERSION = 1
VERSION_KEY = "version"
LEGACY_VERSION_KEYS = ("schema", "model_version")  # what files written before eqkernels 0.2 hold instead


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics a stored model depends on."""
    out = {}
    for name in ("eqkernels", "jax", "jaxlib", "neural-tangents", "e3nn-jax", "numpy", "h5py"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _checksum(kind: str, meta_json: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(meta_json.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _with_one_version_key(meta: dict, version: int | None) -> dict:
    """`meta` with its kind's version under VERSION_KEY only (an old key is moved there; `version` wins)."""
    meta = dict(meta)
    for key in LEGACY_VERSION_KEYS:
        if key in meta:
            meta[VERSION_KEY] = meta.pop(key)
    if version is not None:
        meta[VERSION_KEY] = int(version)
    return meta


def save(path: str | Path, kind: str, meta: dict, arrays: dict[str, np.ndarray], *, version: int | None = None) -> Path:
    """Write a file atomically; `meta` must be JSON-serialisable, arrays numeric or fixed-width text.

    `version`: the version of this kind's fields, stored as meta["version"] (see the module docstring).
    """
    path = Path(path)
    meta = _with_one_version_key(meta, version)
    meta.setdefault("versions", library_versions())
    meta_json = json.dumps(meta, sort_keys=True)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for name, a in arrays.items():
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; store numbers or fixed-width strings")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["kind"] = kind
            f.attrs["meta"] = meta_json
            f.attrs["checksum"] = _checksum(kind, meta_json, arrays)
            for name, a in arrays.items():
                f.create_dataset(name, data=a, compression="gzip" if a.nbytes > 1 << 16 else None)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextmanager
def _opened(path: Path):
    """The open HDF5 file of an eqkernels file; any failure, in here or in the caller's reads, is one
    ModelFileError line (missing, a folder, not HDF5, not an eqkernels file, a missing attribute)."""
    if not path.exists():
        raise ModelFileError("no such file", path)
    if path.is_dir():
        raise ModelFileError("is a folder, not a model file", path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ModelFileError("not an eqkernels file (no eqkernels format marker)", path)
            yield f
    except ModelFileError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise ModelFileError(f"not a readable HDF5 model file ({type(e).__name__}: {str(e).splitlines()[0]})",
                             path) from None


def kind_of(path: str | Path) -> str:
    """The kind of an eqkernels file ("histology-model", "ensemble", ...), without reading its arrays.

    Only a quick look to decide how to load a file; `load` still verifies it in full.
    """
    with _opened(Path(path)) as f:
        return str(f.attrs["kind"])


def load(path: str | Path, kind: str | tuple[str, ...] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a file; returns (meta, arrays). Raises ModelFileError with a one-line reason."""
    path = Path(path)
    with _opened(path) as f:
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise ModelFileError(f"written by a newer eqkernels (file format {version}, this version reads "
                                 f"up to {FORMAT_VERSION}); upgrade eqkernels to use it", path)
        if version < 1:
            raise ModelFileError(f"unknown file format version {version}", path)
        file_kind = str(f.attrs["kind"])
        meta_json = str(f.attrs["meta"])
        arrays = {name: f[name][()] for name in f.keys()}
        checksum = str(f.attrs["checksum"])
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted is not None and file_kind not in wanted:
        raise ModelFileError(f"holds a {file_kind!r}, expected {' or '.join(map(repr, wanted))}", path)
    if _checksum(file_kind, meta_json, arrays) != checksum:
        raise ModelFileError("checksum mismatch: the file is damaged or was modified", path)
    try:
        meta = json.loads(meta_json)
    except ValueError:
        raise ModelFileError("metadata is not valid JSON", path) from None
    return _with_one_version_key(meta, None), arrays


def check_version(meta: dict, max_version: int, path: str | Path, *, label: str = "model",
                  required: bool = False) -> None:
    """Refuse a file whose meta["version"] is newer than `max_version` (or, if `required`, missing)."""
    version = meta.get(VERSION_KEY)
    if version is None and not required:
        return
    if not isinstance(version, int) or version > max_version:
        raise ModelFileError(f"{label} version {version} is newer than this eqkernels reads ({max_version}); "
                             "upgrade eqkernels", path)


def load_model_file(path: str | Path, kind: str, max_version: int, arrays_needed: set[str], *,
                    label: str = "model") -> tuple[dict, dict[str, np.ndarray]]:
    """`load`, then refuse a version newer than `max_version` (or missing) and missing arrays,
    each with one line naming the file."""
    meta, arrays = load(path, kind)
    check_version(meta, max_version, path, label=label, required=True)
    missing = set(arrays_needed) - set(arrays)
    if missing:
        raise ModelFileError(f"model lacks arrays {sorted(missing)}", path)
    return meta, arrays


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary file path that replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def to_jsonable(obj):
    """numpy scalars/arrays → Python numbers/lists, NaN → None, recursively."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON (numpy values converted, NaN → null), written atomically to `path`."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")
