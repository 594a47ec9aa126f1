"""Molecule kernels: the sum of a shared per-atom kernel over all pairs of atoms.

    K(A, B) = Σ_{i ∈ A} Σ_{j ∈ B} k(env_i, env_j)

This is the NNGP / NTK of one per-atom network f applied to every atom and summed, F(A) = Σ_i f(env_i)
(an extensive output, as energies are), so it is invariant to the order of atoms and, when k is, to
rotations. The ENTK authors' molecule kernel pairs atom i of A only with atom i of B (one network per
atom slot), which depends on the atom order; this one does not.

Atoms are processed in tiles of `tile` atoms: each tile pair's atom kernel is contracted with the
tiles' molecule memberships (one-hot, so padding atoms and padded tiles count zero) and added to the
molecule matrix. For a symmetric training matrix only tiles j ≥ i are computed.
"""
from __future__ import annotations

import time
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels.progress import Meter
from eqkernels.so3 import AtomKernel, AtomKernelSpec


def flatten_padded(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Padded molecules (N, A, C, M) with mask (N, A) → flat atoms, molecule index, N."""
    x, mask = np.asarray(x), np.asarray(mask, dtype=bool)
    mol = np.broadcast_to(np.arange(x.shape[0])[:, None], mask.shape)[mask]
    return x[mask], mol, x.shape[0]


def _default_tile(spec: AtomKernelSpec) -> int:
    """Atoms per tile: the (tile², Q) arrays of one tile pair stay near 4 MB (cache-sized; larger tiles
    were up to 3× slower per pair on a 2-core CPU), in multiples of 16."""
    if spec.name == "mlp":
        return 1024
    q = spec.quadrature.size
    return int(max(16, min(128, 16 * round((1_000_000 / q) ** 0.5 / 16))))


@lru_cache(maxsize=32)
def _compiled(spec: AtomKernelSpec, l_max: int, tile: int, dtype):
    """The atom kernel and its jitted tile contraction, shared by every MoleculeKernel of the same
    configuration (so fitting, evaluating and predicting compile once per process)."""
    atom_kernel = AtomKernel(spec, l_max, dtype=dtype)

    def contract(p1, p2, local1, local2):
        nngp, ntk = atom_kernel.pair(p1, p2)
        e1 = jax.nn.one_hot(local1, tile, dtype=nngp.dtype)   # −1 (padding) gives a zero row
        e2 = jax.nn.one_hot(local2, tile, dtype=nngp.dtype)
        return e1.T @ nngp @ e2, e1.T @ ntk @ e2

    return atom_kernel, jax.jit(contract)


class MoleculeKernel:
    """All-pairs molecule kernel of a per-atom kernel; call with flat atoms sorted by molecule."""

    def __init__(self, spec: AtomKernelSpec, l_max: int, *, tile: int | None = None, dtype=jnp.float32,
                 progress: bool | None = True):
        self.spec = spec
        self.tile = int(tile or _default_tile(spec))
        self.atom_kernel, self._contract = _compiled(spec, l_max, self.tile, dtype)
        self.dtype = dtype
        self.progress = progress
        self.last_seconds = 0.0
        self.last_atom_pairs = 0

    def _tiles(self, x, mol):
        """Per tile: prepared atom data, local molecule ids, first molecule index."""
        t = self.tile
        n = len(x)
        pad = (-n) % t if n else t
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        mp = np.concatenate([mol, np.full(pad, -1)]) if pad else mol
        tiles = []
        for s in range(0, len(xp), t):
            m = mp[s:s + t]
            first = int(m[m >= 0].min()) if np.any(m >= 0) else 0
            local = np.where(m >= 0, m - first, -1).astype(np.int32)
            tiles.append((self.atom_kernel.prepare(jnp.asarray(xp[s:s + t], self.dtype)), jnp.asarray(local), first))
        return tiles

    def __call__(self, x1: np.ndarray, mol1: np.ndarray, n1: int, x2: np.ndarray | None = None,
                 mol2: np.ndarray | None = None, n2: int | None = None, *, description: str | None = None):
        """{'nngp': (N1, N2), 'ntk': (N1, N2)} float64; x2=None computes the symmetric K(X1, X1)."""
        start = time.perf_counter()
        x1, mol1 = np.asarray(x1), np.asarray(mol1, dtype=np.int64)
        symmetric = x2 is None
        if symmetric:
            x2, mol2, n2 = x1, mol1, n1
        x2, mol2 = np.asarray(x2), np.asarray(mol2, dtype=np.int64)
        for m, n in ((mol1, n1), (mol2, n2)):
            if len(m) and np.any(np.diff(m) < 0):
                raise ValueError("atoms must be sorted by molecule")
            if len(m) and (m.min() < 0 or m.max() >= n):
                raise ValueError(f"molecule indices must lie in 0..{n - 1}")
        t = self.tile
        out = {k: np.zeros((n1 + t, n2 + t)) for k in ("nngp", "ntk")}
        if len(x1) and len(x2):
            tiles1 = self._tiles(x1, mol1)
            tiles2 = tiles1 if symmetric else self._tiles(x2, mol2)
            pairs = [(i, j) for i in range(len(tiles1)) for j in range(len(tiles2)) if not symmetric or j >= i]
            meter = Meter(len(pairs) * t * t, description or f"{self.spec.name} molecule kernel", unit="atom pairs",
                          enabled=self.progress)
            with meter:
                pending = []
                for i, j in pairs:
                    (p1, l1, f1), (p2, l2, f2) = tiles1[i], tiles2[j]
                    pending.append((i, j, f1, f2, self._contract(p1, p2, l1, l2)))
                    if len(pending) >= 4:  # bounded queue: keeps a few tiles in flight, memory bounded
                        self._flush(pending[:1], out, symmetric)
                        pending = pending[1:]
                        meter.advance(t * t)
                self._flush(pending, out, symmetric)
                meter.advance(len(pending) * t * t)
            self.last_atom_pairs = len(pairs) * t * t
        result = {k: v[:n1, :n2] for k, v in out.items()}
        if symmetric:
            result = {k: v + v.T for k, v in result.items()}
        self.last_seconds = time.perf_counter() - start
        return result

    @staticmethod
    def _flush(pending, out, symmetric):
        for i, j, f1, f2, (nngp, ntk) in pending:
            factor = 0.5 if (symmetric and i == j) else 1.0
            for key, block in (("nngp", nngp), ("ntk", ntk)):
                b = np.asarray(block, dtype=np.float64)
                out[key][f1:f1 + b.shape[0], f2:f2 + b.shape[1]] += factor * b


def molecule_kernel_padded(spec: AtomKernelSpec, l_max: int, x1, mask1, x2=None, mask2=None, **kwargs):
    """All-pairs molecule kernel of padded molecules (N, A, C, M) with atom masks (N, A)."""
    kernel = MoleculeKernel(spec, l_max, **kwargs)
    a, ma, na = flatten_padded(x1, mask1)
    if x2 is None:
        return kernel(a, ma, na)
    b, mb, nb = flatten_padded(x2, mask2)
    return kernel(a, ma, na, b, mb, nb)
