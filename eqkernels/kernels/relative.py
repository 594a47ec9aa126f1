"""Blocked, resumable computation of relative pooled kernels M_g(x, x') = K_pool(x, g·x').

The work is cut into blocks (group element × row block × column block). Each finished block is
written to its own small HDF5 file in a checkpoint folder, atomically (write to a temporary file,
then rename), so a run that is killed at any moment loses at most the blocks in flight and a
rerun with the same inputs computes no finished block twice. The folder carries a fingerprint
of the inputs and the network; a folder made for other inputs is refused.

Blocks are spread over all local JAX devices.

Interpolated groups (`RotationGroup`, C8, C16, D8, …): elements h·P_φ, h in an exact grid group H.
The CNN kernel is jointly invariant under H, so K(h·P_φ x, h'·P_ψ x') = K(P_φ x, h⁻¹h'·P_ψ x'):
every kernel between two orbits is a relative kernel over H between the *stacks* [P_φ x]_φ and
[P_ψ x']_ψ (`rotation_relative_kernels`), (|G|/|H|)² × |H| relative kernels in place of |G|².
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
from eqkernels.groups import PlanarGroup, RotationGroup, get_group, resolve_group
from eqkernels.kernels.engine import (PairEvaluator, check_group_fits_images, default_pairs_per_step,
                                     pair_working_set_bytes)
from eqkernels.kernels.spec import ConvNetSpec
from eqkernels.progress import Meter
from eqkernels.store import atomic_write_text

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
    # Stacked inputs of an interpolated group (see `rotation_relative_kernels`): image i of a set
    # stands for the m = len(fine_angles) rows φ·N + i, [P_φ x_i]_φ; (0.0,) for plain inputs.
    fine_angles: tuple = (0.0,)
    # (|H|, m, m, N1): K_pool(P_φ x1_i, h·P_ψ x1_i), for the family's K(x, x) of stacked inputs.
    pair_self_nngp: np.ndarray | None = None
    pair_self_ntk: np.ndarray | None = None

    @property
    def fine(self) -> int:
        return len(self.fine_angles)

    def take_rows(self, idx) -> "RelativeKernels":
        """The relative kernels of the first set's images `idx` (of N1), stacked layout kept."""
        idx = np.asarray(idx, dtype=int)
        n1 = self.nngp.shape[1] // self.fine
        rows = (np.arange(self.fine)[:, None] * n1 + idx[None]).ravel()
        pick = lambda a, r: None if a is None else a[:, r]  # noqa: E731
        return RelativeKernels(self.group, self.nngp[:, rows], self.ntk[:, rows], pick(self.self1_nngp, rows),
                               pick(self.self1_ntk, rows), self.self2_nngp, self.self2_ntk,
                               fine_angles=self.fine_angles,
                               pair_self_nngp=None if self.pair_self_nngp is None else self.pair_self_nngp[..., idx],
                               pair_self_ntk=None if self.pair_self_ntk is None else self.pair_self_ntk[..., idx])

    def restrict(self, group: PlanarGroup) -> "RelativeKernels":
        """The relative kernels of a subgroup (e.g. C4 inside D4), by element lookup."""
        full = get_group(self.group)
        idx = [full.elements.index(g) for g in group.elements]
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return RelativeKernels(group.name, self.nngp[idx], self.ntk[idx], pick(self.self1_nngp),
                               pick(self.self1_ntk), pick(self.self2_nngp), pick(self.self2_ntk),
                               fine_angles=self.fine_angles, pair_self_nngp=pick(self.pair_self_nngp),
                               pair_self_ntk=pick(self.pair_self_ntk))


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
            atomic_write_text(meta_path, json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
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


def fine_stack(x: np.ndarray, fine_angles: tuple) -> np.ndarray:
    """(m·N, S, S, C): [P_φ x_i] angle-major (row φ·N + i), m = len(fine_angles)."""
    from eqkernels.groups import rotate

    x = np.asarray(x)
    x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)  # float64 stays float64
    return np.concatenate([rotate(x, phi) for phi in fine_angles])


def rotation_relative_kernels(net: ConvNetSpec, x1: np.ndarray, x2: np.ndarray | None, group: RotationGroup, *,
                              need_self: bool = False, dtype=jnp.float32, **kwargs) -> RelativeKernels:
    """Relative kernels over the exact subgroup H between the stacks [P_φ x1]_φ and [P_ψ x2]_ψ.

    Arrays (|H|, m·N1, m·N2) with `fine_angles` set; with `need_self` also the self terms of the
    stacks and `pair_self_*` (|H|, m, m, N1) = K_pool(P_φ x1_i, h·P_ψ x1_i). Other keyword
    arguments go to `relative_kernels`.
    """
    s1 = fine_stack(x1, group.fine_angles)
    s2 = None if x2 is None else fine_stack(x2, group.fine_angles)
    rel = relative_kernels(net, s1, s2, group.exact, need_self=need_self, dtype=dtype, **kwargs)
    rel.fine_angles = tuple(group.fine_angles)
    if need_self:
        m, n1 = rel.fine, len(x1)
        if s2 is None:
            # Symmetric: the pairs of one tile's stack are entries of the matrix itself.
            phi, psi, i = np.meshgrid(np.arange(m), np.arange(m), np.arange(n1), indexing="ij")
            a, b = phi * n1 + i, psi * n1 + i
            rel.pair_self_nngp, rel.pair_self_ntk = rel.nngp[:, a, b], rel.ntk[:, a, b]
        else:
            rel.pair_self_nngp, rel.pair_self_ntk = _pair_self_terms(net, s1, n1, m, group.exact, dtype)
    return rel


def _pair_self_terms(net: ConvNetSpec, stack: np.ndarray, n: int, m: int, exact: PlanarGroup, dtype):
    """(|H|, m, m, N) NNGP and NTK pooled kernels K(P_φ x_i, h·P_ψ x_i) of one stack (m·N images)."""
    phi, psi, i = np.meshgrid(np.arange(m), np.arange(m), np.arange(n), indexing="ij")
    left, right = (phi * n + i).ravel(), (psi * n + i).ravel()
    chunk = 1 << int(np.ceil(np.log2(max(min(len(left), 256), 1))))
    pad = (-len(left)) % chunk
    left_p, right_p = np.concatenate([left, np.zeros(pad, int)]), np.concatenate([right, np.zeros(pad, int)])
    out = np.empty((2, exact.order, len(left)))
    for h, element in enumerate(exact.elements):
        ev = PairEvaluator(net, stack, exact.act(stack, element), dtype=dtype,
                           pairs_per_step=default_pairs_per_step(net, int(stack.shape[1]), dtype))
        parts = [ev(left_p[s:s + chunk], right_p[s:s + chunk]) for s in range(0, len(left_p), chunk)]
        out[0, h] = np.concatenate([p[0] for p in parts])[:len(left)]
        out[1, h] = np.concatenate([p[1] for p in parts])[:len(left)]
    shape = (exact.order, m, m, n)
    return out[0].reshape(shape), out[1].reshape(shape)


def group_relative_kernels(net: ConvNetSpec, x1: np.ndarray, x2: np.ndarray | None, group, **kwargs) -> RelativeKernels:
    """`relative_kernels` for exact grid groups, `rotation_relative_kernels` for interpolated ones."""
    group = resolve_group(group)
    if isinstance(group, RotationGroup):
        return rotation_relative_kernels(net, x1, x2, group, **kwargs)
    return relative_kernels(net, x1, x2, group, **kwargs)
