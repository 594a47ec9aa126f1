"""Blocked, resumable computation of relative pooled kernels M_g(x, x') = K_pool(x, g·x').

The work is cut into blocks (group element × row block × column block). Each finished block is
written to its own small HDF5 file in a checkpoint folder, atomically (write to a temporary file,
then rename), so a run that is killed at any moment loses at most the blocks in flight and a
rerun with the same inputs computes no finished block twice. The folder carries a fingerprint
of the inputs and the network; a folder made for other inputs is refused.

The blocks are driven by the block layer (`eqkernels.blocks`): checkpoint folder, progress, chunks
round-robin over all local JAX devices, or Dask workers with `executor=`.

Interpolated groups (`RotationGroup`, C8, C16, D8, …): elements h·P_φ, h in an exact grid group H.
The CNN kernel is jointly invariant under H, so K(h·P_φ x, h'·P_ψ x') = K(P_φ x, h⁻¹h'·P_ψ x'):
every kernel between two orbits is a relative kernel over H between the *stacks* [P_φ x]_φ and
[P_ψ x']_ψ (`rotation_relative_kernels`), (|G|/|H|)² × |H| relative kernels in place of |G|².
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels.blocks import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Block, BlockStore, fingerprint, round_robin,
                              run_blocks)
from eqkernels.errors import InputError
from eqkernels.groups import PlanarGroup, RotationGroup, get_group, resolve_group
from eqkernels.kernels.engine import (PairEvaluator, check_group_fits_images, default_pairs_per_step,
                                     pair_working_set_bytes)
from eqkernels.kernels.spec import ConvNetSpec

_BlockStore = BlockStore  # the former private name; CHECKPOINT_* re-exported for callers of this module
__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RelativeKernels", "relative_kernels",
           "rotation_relative_kernels", "group_relative_kernels", "fine_stack"]


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
    """Content fingerprint of one relative-kernel job (names its checkpoint folder and Dask tasks)."""
    meta = {"net": net.__dict__, "group": group.name, "dtype": str(np.dtype(dtype))}
    return fingerprint(meta, [None if x is None else np.asarray(x, dtype=np.float32) for x in (x1, x2)])


def _block_pairs(rows: range, cols: range, upper_only: bool) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.meshgrid(np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop), indexing="ij")
    i, j = i.ravel(), j.ravel()
    if upper_only:
        keep = j >= i
        i, j = i[keep], j[keep]
    return i, j


def _block_indices(block: Block) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j) pairs of a block: `where` = (g, kind, (r0, r1), (c0, c1), upper_only)."""
    _, kind, rows, cols, upper = block.where
    if kind != "cross":
        i = np.arange(*rows)
        return i, i
    return _block_pairs(range(*rows), range(*cols), upper)


def _plan(n1: int, n2: int, group: PlanarGroup, symmetric: bool, block_size: int, self_sets: tuple) -> list[Block]:
    """Blocks of the relative kernels (group element × row block × column block), then of the self terms.

    Symmetric: M_{g⁻¹} = M_gᵀ, so only g ≤ g⁻¹ is planned, and for g = g⁻¹ only blocks on or above
    the diagonal. `self_sets`: (name, N) of the sets whose self terms K(x_i, g·x_i) are needed.
    """
    blocks, inverse = [], group.inverse
    for g in range(group.order):
        if symmetric and inverse[g] < g:
            continue  # filled as the transpose of M_{g⁻¹}
        upper = symmetric and inverse[g] == g
        for r0 in range(0, n1, block_size):
            for c0 in range(0, n2, block_size):
                if upper and c0 + block_size <= r0:
                    continue
                rows, cols = (r0, min(r0 + block_size, n1)), (c0, min(c0 + block_size, n2))
                block = Block(f"m_g{g}_r{r0}_c{c0}", 0, (g, "cross", rows, cols, upper and r0 == c0))
                work = len(_block_indices(block)[0])
                if work:
                    blocks.append(Block(block.key, work, block.where))
    for name, n in self_sets:
        for g in range(group.order):
            for r0 in range(0, n, block_size):
                rows = (r0, min(r0 + block_size, n))
                blocks.append(Block(f"{name}_g{g}_r{r0}", rows[1] - rows[0], (g, name, rows, rows, False)))
    return blocks


class _ImageBlocks:
    """The relative-kernel block job: pooled (K, Θ) of a block's pairs (i, j) between x_left and g·x_right."""

    names = ("nngp", "ntk")

    def __init__(self, net: ConvNetSpec, x1: np.ndarray, x2: np.ndarray, group: PlanarGroup, *, dtype, chunk: int,
                 pairs_per_step: int, fingerprint: str):
        self.net, self.x1, self.x2, self.group, self.dtype = net, x1, x2, group, dtype
        self.chunk, self.pairs_per_step, self.fingerprint = chunk, pairs_per_step, fingerprint
        self._evaluators: dict = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_evaluators"] = {}  # device arrays stay in the process that built them
        state.pop("_lock")
        state["dtype"] = np.dtype(self.dtype).name
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def _evaluator(self, g: int, kind: str, device) -> PairEvaluator:
        """The pair evaluator of element g for `kind` on `device`. Features of at most two (g, kind) are
        kept, so memory stays O(N) (blocks come sorted by kind and g) and a Dask worker running two
        blocks at once in threads (hence the lock) does not rebuild them at every block."""
        with self._lock:
            key = (g, kind, device.id)
            if key not in self._evaluators:
                kept = list(dict.fromkeys(k[:2] for k in self._evaluators))  # oldest first
                for old in [k for k in self._evaluators if k[:2] in kept[:-1] and k[:2] != (g, kind)]:
                    del self._evaluators[old]
                left = self.x1 if kind in ("cross", "self1") else self.x2
                right = {"cross": self.x2, "self1": self.x1, "self2": self.x2}[kind]
                with jax.default_device(device):
                    self._evaluators[key] = PairEvaluator(self.net, left, self.group.act(right, self.group.elements[g]),
                                                          dtype=self.dtype, pairs_per_step=self.pairs_per_step)
            return self._evaluators[key]

    def compute(self, block: Block, devices: list, advance) -> dict[str, np.ndarray]:
        """{'nngp', 'ntk'}: (pairs,) float64; chunks of a fixed (padded) length so each shape compiles once."""
        g, kind = block.where[:2]
        i, j = _block_indices(block)
        n, chunk = len(i), self.chunk
        pad = (-n) % chunk
        ii, jj = np.concatenate([i, np.zeros(pad, i.dtype)]), np.concatenate([j, np.zeros(pad, j.dtype)])
        starts = list(range(0, len(ii), chunk))
        dispatch = lambda s, device: self._evaluator(g, kind, device).dispatch(ii[s:s + chunk], jj[s:s + chunk])  # noqa: E731
        outs = []
        for s, out in round_robin(starts, devices, dispatch):
            outs.append(out)
            advance(min(chunk, n - s))
        return {name: np.concatenate([np.asarray(o[k]) for o in outs])[:n].astype(np.float64)
                for k, name in enumerate(self.names)}


def relative_kernels(net: ConvNetSpec, x1: np.ndarray, x2: np.ndarray | None = None,
                     group: PlanarGroup | str | None = None, *, need_self: bool = False,
                     need_self2: bool | None = None, dtype=jnp.float32, block_size: int = 96,
                     chunk: int | None = None,
                     checkpoint: str | Path | None = None, keep_checkpoint: bool = False,
                     memory_budget_mb: float | None = None, progress: bool | None = True,
                     description: str = "kernel", executor=None) -> RelativeKernels:
    """Pooled relative kernels between image sets x1 (N1,H,W,C) and x2 (N2,H,W,C) for a group.

    `x2=None` means x2 = x1: then M_{g⁻¹} = M_gᵀ is used to compute each value once.
    `need_self` adds the self terms K_pool(x_i, g·x_i) of both sets (nonlinear readouts need both,
    posterior variances those of x1); `need_self2=False` skips the second set's.
    `checkpoint` names a folder for resumable per-block results (removed after success unless
    `keep_checkpoint`). `block_size` (pairs per block side) sets the checkpoint granularity;
    `memory_budget_mb` bounds the memory of the pairs evaluated at once (refused if one pair
    alone needs more). `executor`: None (in-process) or an `eqkernels.blocks.DaskExecutor`.
    """
    group = get_group("C1") if group is None else (get_group(group) if isinstance(group, str) else group)
    x1 = np.asarray(x1)
    symmetric = x2 is None
    x2a = x1 if symmetric else np.asarray(x2)
    check_group_fits_images(group, *x1.shape[1:3])  # before any checkpoint file is written
    n1, n2 = len(x1), len(x2a)
    need_self2 = need_self if need_self2 is None else need_self2
    self_sets = () if not need_self or symmetric else ((("self1", n1), ("self2", n2)) if need_self2
                                                        else (("self1", n1),))
    blocks = _plan(n1, n2, group, symmetric, block_size, self_sets)
    job = _ImageBlocks(net, x1, x2a, group, dtype=dtype, pairs_per_step=_pairs_per_step(net, x1, dtype, memory_budget_mb),
                       chunk=_chunk_length(chunk, blocks), fingerprint=_fingerprint(net, x1, None if symmetric else x2a,
                                                                                    group, dtype))
    nngp = np.full((group.order, n1, n2), np.nan, dtype=np.float64)
    ntk = np.full_like(nngp, np.nan)
    selfs = {name: (np.full((group.order, n), np.nan), np.full((group.order, n), np.nan)) for name, n in self_sets}

    def scatter(block: Block, arrays: dict) -> None:
        g, kind = block.where[:2]
        i, j = _block_indices(block)
        a, b = arrays["nngp"], arrays["ntk"]
        if kind == "cross":
            nngp[g, i, j], ntk[g, i, j] = a, b
            if symmetric:
                nngp[group.inverse[g], j, i], ntk[group.inverse[g], j, i] = a, b
        else:
            selfs[kind][0][g, i], selfs[kind][1][g, i] = a, b

    stats = run_blocks(job, blocks, scatter, checkpoint=checkpoint, keep_checkpoint=keep_checkpoint,
                       executor=executor, description=description, progress=progress,
                       valid=lambda block, arrays: len(arrays["nngp"]) == block.work)
    result = RelativeKernels(group.name, nngp, ntk, stats=stats.as_dict())
    if need_self:
        _attach_self_terms(result, selfs, symmetric, need_self2)
    return result


def _pairs_per_step(net: ConvNetSpec, x1: np.ndarray, dtype, memory_budget_mb: float | None) -> int:
    """Pairs evaluated at once within the memory budget (refused if one pair alone needs more)."""
    size = int(x1.shape[2])
    per_pair = pair_working_set_bytes(net, size, dtype)
    if memory_budget_mb is not None and per_pair > memory_budget_mb * 2 ** 20:
        raise InputError(f"one pair of {size}px images needs about {per_pair / 2 ** 20:.0f} MB; "
                         f"the memory budget is {memory_budget_mb:g} MB")
    return default_pairs_per_step(net, size, dtype, memory_budget_mb)


def _chunk_length(chunk: int | None, blocks: list[Block]) -> int:
    """Pairs per dispatched chunk: 256 on CPU, 4096 on accelerators; small jobs get a small power of
    two (less padding, still a handful of compiled shapes)."""
    chunk = chunk or (256 if jax.default_backend() == "cpu" else 4096)
    if blocks:
        chunk = min(chunk, 1 << int(np.ceil(np.log2(max(b.work for b in blocks)))))
    return chunk


def _attach_self_terms(result: RelativeKernels, selfs: dict, symmetric: bool, need_self2: bool) -> None:
    """Self terms K(x_i, g·x_i): the diagonal of a symmetric job, else the computed self blocks."""
    if symmetric:
        diag = np.arange(result.nngp.shape[1])
        result.self1_nngp = result.self2_nngp = result.nngp[:, diag, diag]
        result.self1_ntk = result.self2_ntk = result.ntk[:, diag, diag]
    else:
        result.self1_nngp, result.self1_ntk = selfs["self1"]
        if need_self2:
            result.self2_nngp, result.self2_ntk = selfs["self2"]


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
