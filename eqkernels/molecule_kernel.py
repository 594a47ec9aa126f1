"""Molecule kernels: the sum of a shared per-atom kernel over all pairs of atoms.

    K(A, B) = Σ_{i ∈ A} Σ_{j ∈ B} k(env_i, env_j)

This is the NNGP / NTK of one per-atom network f applied to every atom and summed, F(A) = Σ_i f(env_i)
(an extensive output, as energies are), so it is invariant to the order of atoms and, when k is, to
rotations. The ENTK authors' molecule kernel pairs atom i of A only with atom i of B (one network per
atom slot), which depends on the atom order; this one does not.

Atoms are processed in tiles of `tile` atoms: each tile pair's atom kernel is contracted with the
tiles' molecule memberships (one-hot over the molecules present in the tile, so padding atoms and
padded tiles count zero) and added to those molecules' rows and columns. Numbering the molecules
present in a tile, rather than counting from its first one, keeps molecules without atoms (a
mask row that is all False) from pushing later molecules of the tile out of the one-hot range.
For a symmetric training matrix only tiles j ≥ i are computed.

Optional per-atom amplitudes c_i (`AtomBatch.weight`) give K(A, B) = Σ_{i∈A} Σ_{j∈B} c_i c_j k(env_i, env_j),
the NNGP / NTK of F(A) = Σ_i c_i f(env_i); they scale the atoms' one-hot rows in the contraction, so they
cost nothing, and atoms with c_i = 0 are left out of the tiles altogether. With c_i a function of atom
i's element this is the element-pair weighting W_ab = c_a c_b
(`eqkernels.environments.EnvironmentSpec.element_amplitudes`), positive semi-definite for any c.

With `output_degrees` the per-atom kernel is matrix-valued (`eqkernels.so3_equivariant`): every entry
becomes a flat block of the degree-λ matrices, (N1, N2, Σ(2λ+1)²), summed over atom pairs the same way;
then K(B, A) = K(A, B)ᵀ block by block, which the symmetric case uses.

The tile pairs are grouped into blocks of `block_tiles` × `block_tiles` tiles and driven by the block
layer (`eqkernels.blocks`): a block's result is the (molecules of its row tiles) × (molecules of its
column tiles) partial sum, so blocks checkpoint to HDF5, resume, and run on Dask workers like image
kernel blocks do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels.blocks import Block, BlockStats, fingerprint, round_robin, run_blocks
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
def _compiled(spec: AtomKernelSpec, l_max: int, tile: int, dtype, output_degrees: tuple[int, ...] | None = None):
    """The atom kernel and its jitted tile contraction, shared by every MoleculeKernel of the same
    configuration (so fitting, evaluating and predicting compile once per process)."""
    if output_degrees is None:
        atom_kernel = AtomKernel(spec, l_max, dtype=dtype)
    else:
        from eqkernels.so3_equivariant import EquivariantAtomKernel

        atom_kernel = EquivariantAtomKernel(spec, l_max, output_degrees, dtype=dtype)

    def contract(p1, p2, local1, local2, w1, w2):
        nngp, ntk = atom_kernel.pair(p1, p2)                  # (t, t) or (t, t, block)
        # −1 (padding) gives a zero row; each row carries its atom's amplitude.
        e1 = jax.nn.one_hot(local1, tile, dtype=nngp.dtype) * w1.astype(nngp.dtype)[:, None]
        e2 = jax.nn.one_hot(local2, tile, dtype=nngp.dtype) * w2.astype(nngp.dtype)[:, None]
        return tuple(jnp.einsum("ia,ij...,jb->ab...", e1, k, e2) for k in (nngp, ntk))

    return atom_kernel, jax.jit(contract)


@dataclass(frozen=True)
class AtomBatch:
    """Molecules as flat atoms sorted by molecule: `atoms` (n_atoms, C, M), `molecule` (n_atoms,) int64
    (the molecule of each atom, in 0..n_molecules−1), `n_molecules` (molecules without atoms count too),
    `weight` (n_atoms,) float per-atom amplitudes c_i (None: all 1)."""

    atoms: np.ndarray
    molecule: np.ndarray
    n_molecules: int
    weight: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "atoms", np.asarray(self.atoms))
        object.__setattr__(self, "molecule", np.asarray(self.molecule, dtype=np.int64))
        if self.weight is not None:
            object.__setattr__(self, "weight", np.asarray(self.weight, dtype=np.float64))
            if self.weight.shape != self.molecule.shape:
                raise ValueError(f"weight {self.weight.shape} does not match {self.molecule.shape} atoms")
        m, n = self.molecule, int(self.n_molecules)
        if len(m) and np.any(np.diff(m) < 0):
            raise ValueError("atoms must be sorted by molecule")
        if len(m) and (m.min() < 0 or m.max() >= n):
            raise ValueError(f"molecule indices must lie in 0..{n - 1}")

    @classmethod
    def from_padded(cls, x: np.ndarray, mask: np.ndarray) -> "AtomBatch":
        """From padded molecules (N, A, C, M) with atom masks (N, A)."""
        return cls(*flatten_padded(x, mask))

    def weights(self) -> np.ndarray:
        """(n_atoms,) per-atom amplitudes, ones when none were given."""
        return np.ones(len(self.molecule)) if self.weight is None else self.weight

    def contributing(self) -> "AtomBatch":
        """This batch without its atoms of amplitude 0, which add nothing to any kernel entry (same
        molecules, so a molecule left with no atoms keeps its row of zeros)."""
        if self.weight is None or np.all(self.weight != 0):
            return self
        keep = self.weight != 0
        return AtomBatch(self.atoms[keep], self.molecule[keep], self.n_molecules, self.weight[keep])

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, A, C, M) atoms and (N, A) masks, A the largest molecule's atom count."""
        counts = np.bincount(self.molecule, minlength=self.n_molecules)
        slot = np.arange(len(self.molecule)) - np.repeat(np.cumsum(counts) - counts, counts)
        x = np.zeros((self.n_molecules, int(counts.max(initial=0))) + self.atoms.shape[1:], self.atoms.dtype)
        mask = np.zeros(x.shape[:2], bool)
        x[self.molecule, slot], mask[self.molecule, slot] = self.atoms, True
        return x, mask


@dataclass
class _Tiles:
    """One side cut into tiles of t atoms: atoms (T, t, C, M), local molecule numbers (T, t) (−1:
    padding), per tile the molecule indices its local numbers stand for, and amplitudes (T, t)."""

    atoms: np.ndarray
    local: np.ndarray
    molecules: list
    weight: np.ndarray

    @classmethod
    def cut(cls, batch: AtomBatch, t: int) -> "_Tiles":
        x, mol, w = batch.atoms, batch.molecule, batch.weights()
        pad = (-len(x)) % t if len(x) else t
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        mp = np.concatenate([mol, np.full(pad, -1)]) if pad else mol
        wp = np.concatenate([w, np.zeros(pad)]) if pad else w
        local, molecules = np.full((len(xp) // t, t), -1, np.int32), []
        for k, s in enumerate(range(0, len(xp), t)):
            m = mp[s:s + t]
            real = m >= 0
            present, numbers = np.unique(m[real], return_inverse=True)  # at most t molecules per tile
            local[k, real] = numbers
            molecules.append(present)
        return cls(xp.reshape((-1, t) + x.shape[1:]), local, molecules, wp.reshape(-1, t))

    def block_molecules(self, lo: int, hi: int) -> np.ndarray:
        """The molecules of tiles lo..hi−1, sorted (the rows or columns of a block's partial sum)."""
        return np.unique(np.concatenate(self.molecules[lo:hi]))


class _MoleculeBlocks:
    """The molecule-kernel block job: the partial sum over a block's tile pairs, (rows, cols[, block])."""

    names = ("nngp", "ntk")

    def __init__(self, kernel: "MoleculeKernel", tiles1: _Tiles, tiles2: _Tiles, symmetric: bool, fingerprint: str):
        self.config = (kernel.spec, kernel.l_max, kernel.tile, kernel.dtype, kernel.output_degrees)
        self.tiles1, self.tiles2, self.symmetric, self.fingerprint = tiles1, tiles2, symmetric, fingerprint
        self._prepared: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__, _prepared={})  # device arrays stay in the process that made them
        spec, l_max, tile, dtype, degrees = self.config
        state["config"] = (spec, l_max, tile, np.dtype(dtype).name, degrees)
        return state

    def tile_pairs(self, block: Block) -> list[tuple[int, int]]:
        (i0, i1), (j0, j1) = block.where
        return [(i, j) for i in range(i0, i1) for j in range(j0, j1) if not self.symmetric or j >= i]

    def _side(self, side: int, k: int, device):
        """Prepared atom data and local numbers of tile k of side 1 or 2, on `device` (made once)."""
        key = (side, k, device.id)
        if key not in self._prepared:
            tiles = self.tiles1 if side == 1 else self.tiles2
            atom_kernel = _compiled(*self.config)[0]
            with jax.default_device(device):
                self._prepared[key] = (atom_kernel.prepare(jnp.asarray(tiles.atoms[k], self.config[3])),
                                       jnp.asarray(tiles.local[k]), jnp.asarray(tiles.weight[k], self.config[3]))
        return self._prepared[key]

    def compute(self, block: Block, devices: list, advance) -> dict[str, np.ndarray]:
        """Σ over the block's tile pairs of each tile pair's molecule-summed atom kernel (float64)."""
        contract, t = _compiled(*self.config)[1], self.config[2]
        (i0, i1), (j0, j1) = block.where
        rows, cols = self.tiles1.block_molecules(i0, i1), self.tiles2.block_molecules(j0, j1)
        extra = () if self.config[4] is None else (_compiled(*self.config)[0].block_size,)
        out = {name: np.zeros((len(rows), len(cols)) + extra) for name in self.names}

        def dispatch(ij, device):
            (p1, l1, w1), (p2, l2, w2) = self._side(1, ij[0], device), self._side(2, ij[1], device)
            return contract(p1, p2, l1, l2, w1, w2)

        # A bounded queue keeps a few tile pairs in flight while the host adds up finished ones.
        for (i, j), parts in round_robin(self.tile_pairs(block), devices, dispatch, depth=max(4, len(devices))):
            r = np.searchsorted(rows, self.tiles1.molecules[i])
            c = np.searchsorted(cols, self.tiles2.molecules[j])
            factor = 0.5 if (self.symmetric and i == j) else 1.0
            for name, part in zip(self.names, parts):
                out[name][np.ix_(r, c)] += factor * np.asarray(part, dtype=np.float64)[:len(r), :len(c)]
            advance(t * t)
        return out


@dataclass
class MoleculeKernels:
    """{nngp, ntk} (N1, N2) float64 ((N1, N2, block) with output degrees) and how they were computed."""

    nngp: np.ndarray
    ntk: np.ndarray
    stats: BlockStats

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"nngp": self.nngp, "ntk": self.ntk}


class MoleculeKernel:
    """All-pairs molecule kernel of a per-atom kernel; call with flat atoms sorted by molecule.

    `block_tiles` tiles per block side (default: about 1,024 atoms) sets the checkpoint granularity;
    `executor` (None: in-process) where blocks run. `last_stats` records the last call's `BlockStats`
    (`last_seconds`, `last_atom_pairs` read from it).
    """

    def __init__(self, spec: AtomKernelSpec, l_max: int, *, tile: int | None = None, dtype=jnp.float32,
                 progress: bool | None = True, output_degrees: tuple[int, ...] | None = None,
                 block_tiles: int | None = None, executor=None):
        self.spec, self.l_max = spec, l_max
        self.tile = int(tile or _default_tile(spec))
        self.block_tiles = int(block_tiles or max(1, 1024 // self.tile))
        self.output_degrees = None if output_degrees is None else tuple(output_degrees)
        self.atom_kernel, self._contract = _compiled(spec, l_max, self.tile, dtype, self.output_degrees)
        self.dtype = dtype
        self.progress = progress
        self.executor = executor
        self.last_stats = BlockStats()

    @property
    def last_seconds(self) -> float:
        return self.last_stats.seconds

    @property
    def last_atom_pairs(self) -> int:
        return self.last_stats.pairs

    def _fingerprint(self, b1: AtomBatch, b2: AtomBatch | None) -> str:
        meta = {"kernel": "molecule", "spec": asdict(self.spec), "l_max": self.l_max, "tile": self.tile,
                "dtype": np.dtype(self.dtype).name, "output_degrees": self.output_degrees,
                "block_tiles": self.block_tiles, "n": [b1.n_molecules, None if b2 is None else b2.n_molecules]}
        arrays = [b1.atoms, b1.molecule] + ([None] if b2 is None else [b2.atoms, b2.molecule])
        # Amplitudes join the fingerprint only when given, so checkpoints of unweighted kernels stay valid.
        arrays += [b.weight for b in (b1, b2) if b is not None and b.weight is not None]
        return fingerprint(meta, arrays)

    def _plan(self, tiles1: _Tiles, tiles2: _Tiles, symmetric: bool) -> list[Block]:
        bt, t, blocks = self.block_tiles, self.tile, []
        for i0 in range(0, len(tiles1.atoms), bt):
            for j0 in range(i0 if symmetric else 0, len(tiles2.atoms), bt):
                where = ((i0, min(i0 + bt, len(tiles1.atoms))), (j0, min(j0 + bt, len(tiles2.atoms))))
                n = sum(1 for i in range(*where[0]) for j in range(*where[1]) if not symmetric or j >= i)
                blocks.append(Block(f"mol_r{i0}_c{j0}", n * t * t, where))
        return blocks

    def compute(self, batch1: AtomBatch, batch2: AtomBatch | None = None, *, description: str | None = None,
                checkpoint=None, keep_checkpoint: bool = False, executor=None) -> MoleculeKernels:
        """K(batch1, batch2) (batch2=None: the symmetric K(batch1, batch1)) with the run's statistics.

        `checkpoint`: folder of finished blocks (resumable; removed after success unless `keep_checkpoint`).
        """
        symmetric = batch2 is None
        # Atoms of amplitude 0 (e.g. H with `element_amplitudes` c_H = 0) are dropped before tiling: with
        # c_H = 0 on QM9 about half the atoms go and the kernel costs about a quarter.
        batch1 = batch1.contributing()
        batch2 = None if symmetric else batch2.contributing()
        b2 = batch1 if symmetric else batch2
        block = () if self.output_degrees is None else (self.atom_kernel.block_size,)
        out = {k: np.zeros((batch1.n_molecules, b2.n_molecules) + block) for k in ("nngp", "ntk")}
        stats = BlockStats(executor="none")
        if len(batch1.atoms) and len(b2.atoms):
            tiles1 = _Tiles.cut(batch1, self.tile)
            tiles2 = tiles1 if symmetric else _Tiles.cut(b2, self.tile)
            job = _MoleculeBlocks(self, tiles1, tiles2, symmetric, self._fingerprint(batch1, batch2))

            def scatter(blk: Block, arrays: dict) -> None:
                rows, cols = tiles1.block_molecules(*blk.where[0]), tiles2.block_molecules(*blk.where[1])
                for name in out:
                    out[name][np.ix_(rows, cols)] += arrays[name]  # each block once: no lost updates

            blocks = self._plan(tiles1, tiles2, symmetric)
            stats = run_blocks(job, blocks, scatter, checkpoint=checkpoint, keep_checkpoint=keep_checkpoint,
                               executor=executor or self.executor, unit="atom pairs", progress=self.progress,
                               description=description or f"{self.spec.name} molecule kernel",
                               valid=lambda blk, arrays: arrays["nngp"].shape[:2] == (
                                   len(tiles1.block_molecules(*blk.where[0])),
                                   len(tiles2.block_molecules(*blk.where[1]))))
        if symmetric:
            out = {k: v + self._transposed(v) for k, v in out.items()}
        self.last_stats = stats
        return MoleculeKernels(out["nngp"], out["ntk"], stats)

    def __call__(self, x1: np.ndarray, mol1: np.ndarray, n1: int, x2: np.ndarray | None = None,
                 mol2: np.ndarray | None = None, n2: int | None = None, *, description: str | None = None,
                 checkpoint=None, keep_checkpoint: bool = False, executor=None, weight1=None, weight2=None):
        """{'nngp': (N1, N2), 'ntk': (N1, N2)} float64 ((N1, N2, block) with output degrees);
        x2=None computes the symmetric K(X1, X1). `weight1`, `weight2`: per-atom amplitudes (None: 1; see
        `AtomBatch`). See `compute` for the other arguments."""
        b1 = AtomBatch(x1, mol1, n1, weight1)
        b2 = None if x2 is None else AtomBatch(x2, mol2, n2, weight2)
        return self.compute(b1, b2, description=description, checkpoint=checkpoint,
                            keep_checkpoint=keep_checkpoint, executor=executor).as_dict()

    def _transposed(self, v: np.ndarray) -> np.ndarray:
        """K(B, A) from K(A, B): swap the molecule axes and, for matrix blocks, transpose each block."""
        if self.output_degrees is None:
            return v.T
        from eqkernels.so3_equivariant import block_transpose

        return v.swapaxes(0, 1)[..., block_transpose(self.output_degrees)]


def molecule_kernel_padded(spec: AtomKernelSpec, l_max: int, x1, mask1, x2=None, mask2=None, **kwargs):
    """All-pairs molecule kernel of padded molecules (N, A, C, M) with atom masks (N, A)."""
    kernel = MoleculeKernel(spec, l_max, **kwargs)
    a, ma, na = flatten_padded(x1, mask1)
    if x2 is None:
        return kernel(a, ma, na)
    b, mb, nb = flatten_padded(x2, mask2)
    return kernel(a, ma, na, b, mb, nb)
