"""Blocked, resumable computation of relative pooled kernels M_g(x, x') = K_pool(x, g·x').

The work is cut into blocks (group element × row block × column block). Each finished block is
written to its own small HDF5 file in a checkpoint folder, atomically (write to a temporary file,
then rename), so a run that is killed at any moment loses at most the blocks in flight and a
rerun with the same inputs computes no finished block twice. The folder carries a fingerprint
of the inputs and the network; a folder made for other inputs is refused.

Blocks are spread over all local JAX devices.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from eqkernels.errors import InputError
from eqkernels.groups import PlanarGroup, get_group
from eqkernels.kernels.engine import (PairEvaluator, check_group_fits_images, default_pairs_per_step,
                                     pair_working_set_bytes)
from eqkernels.kernels.spec import ConvNetSpec
from eqkernels.progress import Meter

CHECKPOINT_FORMAT = "eqkernels-kernel-blocks"
CHECKPOINT_VERSION = 1


@dataclass
class RelativeKernels:
    """Pooled relative kernels for one group: arrays (|G|, N1, N2); self terms (|G|, N) or None.

    `nngp[g, i, j] = K_pool(x1_i, g·x2_j)`, likewise `ntk`. `self1[...][g, i] = K_pool(x1_i, g·x1_i)`.
    """

    group: str
    nngp: np.ndarray
    ntk: np.ndarray
    self1_nngp: np.ndarray | None = None
    self1_ntk: np.ndarray | None = None
    self2_nngp: np.ndarray | None = None
    self2_ntk: np.ndarray | None = None
    stats: dict = field(default_factory=dict)  # blocks, blocks resumed from a checkpoint, pairs, seconds

    def restrict(self, group: PlanarGroup) -> "RelativeKernels":
        """The relative kernels of a subgroup (e.g. C4 inside D4), by element lookup."""
        full = get_group(self.group)
        idx = [full.elements.index(g) for g in group.elements]
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return RelativeKernels(group.name, self.nngp[idx], self.ntk[idx], pick(self.self1_nngp),
                               pick(self.self1_ntk), pick(self.self2_nngp), pick(self.self2_ntk))


def _fingerprint(net: ConvNetSpec, x1: np.ndarray, x2: np.ndarray | None, group: PlanarGroup, dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"net": net.__dict__, "group": group.name, "dtype": str(np.dtype(dtype)),
                         "format": CHECKPOINT_VERSION}, sort_keys=True).encode())
    for x in (x1, x2):
        if x is None:
            h.update(b"symmetric")
        else:
            h.update(str(x.shape).encode())
            h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return h.hexdigest()


class _BlockStore:
    """A checkpoint folder with one HDF5 file per finished block."""

    def __init__(self, folder: str | Path | None, fingerprint: str):
        self.folder = None if folder is None else Path(folder)
        if self.folder is None:
            return
        meta_path = self.folder / "checkpoint.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"unreadable checkpoint metadata ({e})", meta_path) from None
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
                raise InputError("checkpoint folder belongs to other inputs or another kernel; "
                                 "remove it or choose another --checkpoint", self.folder)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(meta_path, json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                                      "fingerprint": fingerprint}))

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.h5"

    def load(self, key: str):
        if self.folder is None or not self._path(key).exists():
            return None
        try:
            with h5py.File(self._path(key), "r") as f:
                return f["nngp"][()], f["ntk"][()]
        except (OSError, KeyError):
            return None  # a damaged block is simply computed again

    def save(self, key: str, nngp: np.ndarray, ntk: np.ndarray) -> None:
        if self.folder is None:
            return
        tmp = self.folder / f".{key}.h5.tmp{os.getpid()}"
        with h5py.File(tmp, "w") as f:
            f["nngp"] = nngp
            f["ntk"] = ntk
        os.replace(tmp, self._path(key))

    def remove(self) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _block_pairs(rows: range, cols: range, upper_only: bool) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.meshgrid(np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop), indexing="ij")
    i, j = i.ravel(), j.ravel()
    if upper_only:
        keep = j >= i
        i, j = i[keep], j[keep]
    return i, j


def relative_kernels(net: ConvNetSpec, x1: np.ndarray, x2: np.ndarray | None = None,
                     group: PlanarGroup | str | None = None, *, need_self: bool = False,
                     need_self2: bool | None = None, dtype=jnp.float32, block_size: int = 96,
                     chunk: int | None = None,
                     checkpoint: str | Path | None = None, keep_checkpoint: bool = False,
                     memory_budget_mb: float | None = None, progress: bool | None = True,
                     description: str = "kernel") -> RelativeKernels:
    """Pooled relative kernels between image sets x1 (N1,H,W,C) and x2 (N2,H,W,C) for a group.

    `x2=None` means x2 = x1: then M_{g⁻¹} = M_gᵀ is used to compute each value once.
    `need_self` adds the self terms K_pool(x_i, g·x_i) of both sets (nonlinear readouts need both,
    posterior variances those of x1); `need_self2=False` skips the second set's.
    `checkpoint` names a folder for resumable per-block results (removed after success unless
    `keep_checkpoint`). `block_size` (pairs per block side) sets the checkpoint granularity;
    `memory_budget_mb` bounds the memory of the pairs evaluated at once (refused if one pair
    alone needs more).
    """
    group = get_group("C1") if group is None else (get_group(group) if isinstance(group, str) else group)
    x1 = np.asarray(x1)
    symmetric = x2 is None
    x2a = x1 if symmetric else np.asarray(x2)
    check_group_fits_images(group, *x1.shape[1:3])  # before any checkpoint file is written
    n1, n2, order = len(x1), len(x2a), group.order
    inverse = group.inverse
    store = _BlockStore(checkpoint, _fingerprint(net, x1, None if symmetric else x2a, group, dtype))
    devices = jax.local_devices()
    chunk = chunk or (256 if jax.default_backend() == "cpu" else 4096)
    size = int(x1.shape[2])
    per_pair = pair_working_set_bytes(net, size, dtype)
    if memory_budget_mb is not None and per_pair > memory_budget_mb * 2 ** 20:
        raise InputError(f"one pair of {size}px images needs about {per_pair / 2 ** 20:.0f} MB; "
                         f"the memory budget is {memory_budget_mb:g} MB")
    pairs_per_step = default_pairs_per_step(net, size, dtype, memory_budget_mb)

    # Plan: (key, g, pairs) for every block to compute, and how each result is scattered.
    tasks = []
    for g in range(order):
        if symmetric and inverse[g] < g:
            continue  # filled as the transpose of M_{g⁻¹}
        upper = symmetric and inverse[g] == g
        for r0 in range(0, n1, block_size):
            for c0 in range(0, n2, block_size):
                if upper and c0 + block_size <= r0:
                    continue
                rows, cols = range(r0, min(r0 + block_size, n1)), range(c0, min(c0 + block_size, n2))
                i, j = _block_pairs(rows, cols, upper and r0 == c0)
                if len(i):
                    tasks.append((f"m_g{g}_r{r0}_c{c0}", g, i, j, "cross"))
    need_self2 = need_self if need_self2 is None else need_self2
    if need_self and not symmetric:
        for name, n in (("self1", n1), ("self2", n2)) if need_self2 else (("self1", n1),):
            for g in range(order):
                for r0 in range(0, n, block_size):
                    i = np.arange(r0, min(r0 + block_size, n))
                    tasks.append((f"{name}_g{g}_r{r0}", g, i, i, name))

    nngp = np.full((order, n1, n2), np.nan, dtype=np.float64)
    ntk = np.full_like(nngp, np.nan)
    selfs = {name: (np.full((order, n), np.nan), np.full((order, n), np.nan))
             for name, n in (("self1", n1), ("self2", n2))} if need_self and not symmetric else {}

    def scatter(task, a, b):
        _, g, i, j, kind = task
        if kind == "cross":
            nngp[g, i, j], ntk[g, i, j] = a, b
            if symmetric:
                nngp[inverse[g], j, i], ntk[inverse[g], j, i] = a, b
        else:
            selfs[kind][0][g, i], selfs[kind][1][g, i] = a, b

    total = sum(len(t[2]) for t in tasks)
    started = time.perf_counter()
    if tasks:  # small jobs get a small chunk: less padding, still a handful of compiled shapes
        chunk = min(chunk, 1 << int(np.ceil(np.log2(max(len(t[2]) for t in tasks)))))
    pending = []
    for task in tasks:
        found = store.load(task[0])
        if found is not None and len(found[0]) == len(task[2]):
            scatter(task, *found)
        else:
            pending.append(task)

    evaluators: dict = {}

    def evaluator(g: int, kind: str, device) -> PairEvaluator:
        if evaluators.get("key") != (g, kind):
            evaluators.clear()  # one group element at a time keeps feature memory at O(N)
            evaluators["key"] = (g, kind)
        if device.id not in evaluators:
            left = x1 if kind in ("cross", "self1") else x2a
            right = {"cross": x2a, "self1": x1, "self2": x2a}[kind]
            with jax.default_device(device):
                evaluators[device.id] = PairEvaluator(net, left, group.act(right, group.elements[g]),
                                                      dtype=dtype, pairs_per_step=pairs_per_step)
        return evaluators[device.id]

    with Meter(total, description, enabled=progress) as meter:
        meter.advance(total - sum(len(t[2]) for t in pending))
        pending.sort(key=lambda t: (t[4], t[1]))
        for task in pending:
            _, g, i, j, kind = task
            # Chunks of a fixed length (padded) so each shape compiles once; round-robin over devices.
            n = len(i)
            pad = (-n) % chunk
            ii, jj = np.concatenate([i, np.zeros(pad, i.dtype)]), np.concatenate([j, np.zeros(pad, j.dtype)])
            outs, unreported = [], 0
            for c, s in enumerate(range(0, len(ii), chunk)):
                ev = evaluator(g, kind, devices[c % len(devices)])
                outs.append(ev.dispatch(ii[s:s + chunk], jj[s:s + chunk]))  # asynchronous
                unreported += min(chunk, n - s)
                if len(outs) % len(devices) == 0 or s + chunk >= len(ii):
                    jax.block_until_ready(outs[-len(devices):])
                    meter.advance(unreported)
                    unreported = 0
            a = np.concatenate([np.asarray(o[0]) for o in outs])[:n].astype(np.float64)
            b = np.concatenate([np.asarray(o[1]) for o in outs])[:n].astype(np.float64)
            store.save(task[0], a, b)
            scatter(task, a, b)

    result = RelativeKernels(group.name, nngp, ntk, stats={
        "blocks": len(tasks), "blocks_resumed": len(tasks) - len(pending), "pairs": total,
        "pairs_computed": sum(len(t[2]) for t in pending), "seconds": time.perf_counter() - started})
    if need_self:
        if symmetric:
            diag = np.arange(n1)
            result.self1_nngp = result.self2_nngp = nngp[:, diag, diag]
            result.self1_ntk = result.self2_ntk = ntk[:, diag, diag]
        else:
            result.self1_nngp, result.self1_ntk = selfs["self1"]
            if need_self2:
                result.self2_nngp, result.self2_ntk = selfs["self2"]
    if not keep_checkpoint:
        store.remove()
    return result
