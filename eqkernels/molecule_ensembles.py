"""Deep ensembles of per-atom MLPs on molecules: the finite-width twin of the `mlp` molecule kernel.

One member is a shared per-atom network f applied to every atom's environment signal (real
spherical-harmonic coefficients (C, (L+1)²), flattened to d = C·(L+1)² numbers) and summed over the
atoms of a molecule, F(A) = Σ_{i∈A} f(x_i). f is the MLP of `AtomKernelSpec("mlp")` in the NTK
parametrisation: every parameter is N(0, 1) and each layer computes

    h¹ = σ_w/√d · W⁰ x + σ_b · b⁰,   h^{l+1} = σ_w/√n · W^l φ(h^l) + σ_b · b^l,   f = σ_o/√n · w·φ(h^depth) + σ_ob · b,

with n = `width` hidden units, so as n → ∞ its NTK is the analytic `mlp` per-atom kernel and the NTK
of F is the all-pairs molecule kernel of `eqkernels.molecule_kernel` (checked in the tests). f is
built as a neural-tangents stax triple (`network`), so nt's `kernel_fn` of the very network that is
trained is the oracle of the analytic kernel; the spec holds the layers as an `AtomKernelSpec`
(`AtomMLPEnsembleSpec.net`), and the training loop and files are those of `eqkernels._ensemble_core`.

Training: full-batch gradient descent (optax.sgd) on ½ Σ_A (F(A) − y_A)², all members at once (one
jit-compiled step vmapped over a chunk of members); after k steps at learning rate η the mean of an
infinitely wide, infinitely large ensemble is μ_k = Θ(x, X) Θ⁻¹ (I − (I − ηΘ)^k) Y
(`eqkernels.solvers.dual_coefficients(..., discrete=True)`).

Augmentation (`augment=True`): at every step each member sees every training molecule rotated by
its own fresh Haar-random rotation R (drawn in JAX), applied to the atom signals as the Wigner
matrices D(R) — exactly what recomputing the environments from rotated coordinates gives, at a
fraction of the cost. The per-atom MLP kernel is jointly invariant, Θ(D x, D x′) = Θ(x, x′), so the
expected step acts with the SO(3)-averaged kernel: the mean of the augmented ensemble follows μ_k of
`mlp-so3avg` at the same η and is invariant at every step (Gerken & Kessel 2024); finite ensembles
approach it as members are added.

Centred members (`centred=True`) are F(x; θ) − F(x; θ₀), θ₀ frozen: they start at 0, so the
ensemble mean approaches μ_k as the width grows whatever the number of members.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels import _ensemble_core as core
from eqkernels import store
from eqkernels.errors import ModelFileError
from eqkernels.so3 import DEFAULT_QUADRATURE_DEGREE, AtomKernelSpec, wigner_blocks, wigner_d

MOLECULE_ENSEMBLE_KIND = "molecule-ensemble"
MOLECULE_ENSEMBLE_SCHEMA = core.ENSEMBLE_FILE_VERSION
CACHED_ARCHITECTURES = 32  # compiled networks, outputs and steps kept per (architecture, data size)
# The network fields of an `mlp` AtomKernelSpec, stored flat in ensemble files written before specs nested.
_LEGACY_NET_FIELDS = ("depth", "activation", "weight_std", "bias_std", "readout_weight_std", "readout_bias_std")


def _mlp_net(kernel_spec: AtomKernelSpec) -> AtomKernelSpec:
    """The `mlp` spec of the same layers (the quadrature fields, meaningless for a network, at defaults)."""
    return replace(kernel_spec, name="mlp", quadrature_degree=DEFAULT_QUADRATURE_DEGREE, filter_band_limit=None)


@dataclass(frozen=True)
class AtomMLPEnsembleSpec:
    """Per-atom MLP (the layers of `net`, an `mlp` kernel spec, at finite `width`) and how its members are trained."""

    net: AtomKernelSpec = field(default_factory=lambda: AtomKernelSpec("mlp"))
    width: int = 64
    members: int = 10
    steps: int = 100
    learning_rate: float = 0.01
    augment: bool = False               # a fresh random rotation of every molecule at every step
    centred: bool = False               # members are F(x; θ) − F(x; θ₀)
    seed: int = 0

    def __post_init__(self):
        if self.net.name != "mlp":
            raise ValueError(f"the network of a per-atom MLP ensemble is an `mlp` spec, got {self.net.name!r} "
                             "(AtomMLPEnsembleSpec.twin_of makes one from an mlp-so3avg spec)")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        core.check_schedule(self.members, self.steps, self.learning_rate)

    @classmethod
    def twin_of(cls, kernel_spec: AtomKernelSpec, **kwargs) -> "AtomMLPEnsembleSpec":
        """The finite network of an `mlp` (or `mlp-so3avg`: same network) kernel spec."""
        if kernel_spec.name == "so3gcnn":
            raise ValueError("the finite twin of so3gcnn is not a per-atom MLP")
        return cls(net=_mlp_net(kernel_spec), **kwargs)

    def kernel_spec(self, name: str = "mlp", **kwargs) -> AtomKernelSpec:
        """The infinite-width kernel of this network (`mlp`), or its SO(3) average (`mlp-so3avg`)."""
        return replace(self.net, name=name, **kwargs)

    @property
    def label(self) -> str:
        return "mlp" + (" +SO(3) aug" if self.augment else "") + (" centred" if self.centred else "")

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "net"}, "net": self.net.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "AtomMLPEnsembleSpec":
        """From `to_dict`, or from the flat layout of older files (the network fields beside `width`)."""
        d = dict(d)
        if "net" in d:
            net = AtomKernelSpec.from_dict(d.pop("net"))
        else:
            net = AtomKernelSpec("mlp", **{k: d.pop(k) for k in _LEGACY_NET_FIELDS if k in d})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ensemble options {sorted(unknown)}")
        return cls(net=net, **d)


def _architecture(spec: AtomMLPEnsembleSpec) -> AtomMLPEnsembleSpec:
    """Only the fields that fix the network and the step (one compiled function per architecture)."""
    return replace(spec, members=1, steps=0, seed=0)


# ------------------------------------------------------------------------------------------- network

def network(spec: AtomMLPEnsembleSpec):
    """nt.stax (init_fn, apply_fn, kernel_fn) of the per-atom MLP on flattened atom signals (A, C·M) → (A, 1).

    Dense(width), φ, (Dense(width), φ)×(depth−1), Dense(1), NTK parametrisation: its `kernel_fn` is the
    analytic `mlp` per-atom kernel of `eqkernels.so3` (checked in the tests).
    """
    return _network(spec.net, spec.width)


@lru_cache(maxsize=CACHED_ARCHITECTURES)
def _network(net: AtomKernelSpec, width: int):
    from neural_tangents import stax

    phi = stax.Relu if net.activation == "relu" else stax.Erf
    layers = []
    for _ in range(net.depth):
        layers += [stax.Dense(width, W_std=net.weight_std, b_std=net.bias_std, parameterization="ntk"), phi()]
    layers.append(stax.Dense(1, W_std=net.readout_weight_std, b_std=net.readout_bias_std, parameterization="ntk"))
    return stax.serial(*layers)


def init_member(spec: AtomMLPEnsembleSpec, key, n_features: int) -> list:
    """N(0, 1) parameters of one member (the stax layout of `network`) for `n_features` = C·(L+1)² numbers.

    Drawn with the key schedule of eqkernels 0.1 (split into 2·depth + 2 keys, weights and biases in
    order) rather than stax's own init_fn, so that seeded ensembles and their figures are unchanged;
    the tree's shapes are those of the stax init_fn (checked when files load).
    """
    keys = jax.random.split(key, 2 * spec.net.depth + 2)
    sizes = [n_features] + [spec.width] * spec.net.depth + [1]
    params = []
    for layer in range(spec.net.depth + 1):
        weight = jax.random.normal(keys[2 * layer], (sizes[layer], sizes[layer + 1]))
        bias = jax.random.normal(keys[2 * layer + 1], (sizes[layer + 1],))
        params += [(weight, bias[None]), ()]
    return params[:-1]  # no activation after the readout


def atom_outputs(spec: AtomMLPEnsembleSpec, params: list, x) -> jnp.ndarray:
    """f(x_i) of every atom, (A,), for atom signals x (A, C, M) (the stax network's apply_fn)."""
    return network(spec)[1](params, x.reshape(x.shape[0], -1))[:, 0]


def molecule_outputs(spec: AtomMLPEnsembleSpec, params: list, x, mol, n_molecules: int) -> jnp.ndarray:
    """F(A) = Σ_{i∈A} f(x_i), (N,), for flat atoms x (A, C, M) with molecule index mol (A,).

    Atoms with index −1 (padding) count zero."""
    per_atom = atom_outputs(spec, params, x)
    return jax.ops.segment_sum(jnp.where(mol >= 0, per_atom, 0.0), jnp.maximum(mol, 0), num_segments=n_molecules)


def rotate_atoms(x, mol, wigner) -> jnp.ndarray:
    """Atom signals of rotated molecules: D(R_{mol(i)}) x_i, for x (A, C, M), wigner (N, M, M)."""
    d = wigner[jnp.maximum(mol, 0)]
    l_max = int(round(math.sqrt(x.shape[-1]))) - 1
    # D is block diagonal: rotating degree by degree costs Σ(2l+1)² instead of (L+1)⁴ per channel.
    # Broadcast-multiply-sum rather than einsum: XLA on CPU runs thousands of tiny batched matmuls
    # slowly (30× slower here), the fused elementwise form fast.
    blocks = [jnp.sum(d[:, None, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] * x[:, :, None, l * l:(l + 1) ** 2], axis=-1)
              for l in range(l_max + 1)]
    return jnp.concatenate(blocks, axis=-1)


def rotate_molecules(x: np.ndarray, mol: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """NumPy version of `rotate_atoms` from rotation matrices (N, 3, 3), in float64 Wigner matrices."""
    l_max = int(round(math.sqrt(x.shape[-1]))) - 1
    d = wigner_d(l_max, rotations)[np.asarray(mol)]
    return np.einsum("amn,acn->acm", d, np.asarray(x, np.float64)).astype(np.float32)


# ------------------------------------------------------------------------------------------ ensembles

@dataclass
class MoleculeEnsemble(core.MemberEnsemble):
    """Trained members: the stax parameter tree of `network` with a leading member axis on every leaf."""

    spec: AtomMLPEnsembleSpec
    atom_shape: tuple[int, int]          # (C, M) of one atom signal
    params: Any
    initial_params: Any = None           # θ₀ of centred members, else None
    loss_history: np.ndarray | None = None  # (steps, members): loss before each step
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)

    def outputs(self, x: np.ndarray, mol: np.ndarray, n_molecules: int, *, member_chunk: int = 16) -> np.ndarray:
        """Every member's molecule outputs (M, N), float64, for flat atoms x (A, C, M) sorted by molecule."""
        x = np.asarray(x, np.float32)
        if x.shape[1:] != tuple(self.atom_shape):
            raise ValueError(f"atom signals of shape {x.shape[1:]} do not fit this ensemble's {tuple(self.atom_shape)}")
        fn = _outputs_fn(_architecture(self.spec), int(n_molecules))
        out = []
        for first in range(0, self.members, member_chunk):
            part = self.select(np.arange(first, min(first + member_chunk, self.members)))
            out.append(np.asarray(fn(part.params, part.initial_params, jnp.asarray(x), jnp.asarray(mol, jnp.int32)),
                                  np.float64))
        return np.concatenate(out) if out else np.zeros((0, n_molecules))

    def mean(self, x, mol, n_molecules) -> np.ndarray:
        return self.outputs(x, mol, n_molecules).mean(axis=0)

    # ------------------------------------------------------------------------------------ files
    def save(self, path: str | Path, meta: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> Path:
        """HDF5 file (eqkernels.store): parameter leaves by tree path, spec as JSON; `meta`/`arrays` add task fields."""
        entries, own_arrays = self.parameter_arrays()
        own_meta = {"spec": self.spec.to_dict(), "atom_shape": list(self.atom_shape), "members": self.members,
                    "seconds": self.seconds, "parameters": entries}
        return core.save_with_extras(path, MOLECULE_ENSEMBLE_KIND, own_meta, own_arrays, meta, arrays)

    @classmethod
    def load(cls, path: str | Path) -> tuple["MoleculeEnsemble", dict, dict[str, np.ndarray]]:
        """(ensemble, meta, arrays); every stored parameter is checked against the architecture."""
        meta, arrays = store.load(path, MOLECULE_ENSEMBLE_KIND)
        store.check_version(meta, MOLECULE_ENSEMBLE_SCHEMA, path, label="molecule ensemble")
        try:
            spec = AtomMLPEnsembleSpec.from_dict(meta["spec"])
            atom_shape = tuple(int(v) for v in meta["atom_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"ensemble file lacks or garbles a field ({type(e).__name__}: {e})", path) from None
        template = jax.eval_shape(lambda k: network(spec)[0](k, (-1, atom_shape[0] * atom_shape[1]))[1],
                                  jax.random.PRNGKey(0))
        stored = meta if "parameters" in meta else _legacy_layout(meta, arrays, template)
        trees = core.stored_trees(stored, arrays, template, spec.centred, path)
        return (cls(spec, atom_shape, trees["param"], trees["initial"], arrays.get("loss_history"),
                    float(meta.get("seconds", 0.0))), meta, arrays)


def _legacy_layout(meta: dict, arrays: dict, template) -> dict:
    """meta["parameters"] for a file of eqkernels 0.1, whose leaves were named w0, b0, …, w_out, b_out
    (in the stax tree's order, with the readout's and biases' unit axes dropped): those arrays are
    reshaped in place to the template's shapes where their sizes agree (else the check refuses them)."""
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    n_hidden = (len(leaves) - 2) // 2
    names = [f"{kind}{layer}" for layer in range(n_hidden) for kind in "wb"] + ["w_out", "b_out"]
    entries = []
    for prefix in core.TREES:
        for (path, leaf), name in zip(leaves, names):
            value = arrays.get(f"{prefix}_{name}")
            if value is None:
                continue
            if value.size == value.shape[0] * math.prod(leaf.shape):
                arrays[f"{prefix}_{name}"] = value.reshape((value.shape[0],) + tuple(leaf.shape))
            entries.append({"name": f"{prefix}_{name}", "tree": prefix, "path": jax.tree_util.keystr(path)})
    return {**meta, "parameters": entries}


@lru_cache(maxsize=CACHED_ARCHITECTURES)
def _outputs_fn(arch: AtomMLPEnsembleSpec, n_molecules: int):
    def member(p, p0, x, mol):
        out = molecule_outputs(arch, p, x, mol, n_molecules)
        if p0 is not None:
            out = out - molecule_outputs(arch, p0, x, mol, n_molecules)
        return out

    return jax.jit(jax.vmap(member, in_axes=(0, 0, None, None)))


@lru_cache(maxsize=CACHED_ARCHITECTURES)
def _step_fn(arch: AtomMLPEnsembleSpec, n_molecules: int, l_max: int):
    """(optimizer, jit step vmapped over members) for one architecture and training-set size."""
    import e3nn_jax as e3nn
    import optax

    optimizer = optax.sgd(arch.learning_rate)

    def member_loss(p, p0, key, x, mol, y):
        if arch.augment:
            rotations = e3nn.rand_matrix(key, (n_molecules,), dtype=x.dtype)
            x = rotate_atoms(x, mol, wigner_blocks(l_max, rotations))
        out = molecule_outputs(arch, p, x, mol, n_molecules)
        if p0 is not None:
            out = out - jax.lax.stop_gradient(molecule_outputs(arch, p0, x, mol, n_molecules))
        return 0.5 * jnp.sum((out - y) ** 2)

    def member_step(p, opt_state, p0, member_key, k, x, mol, y):
        loss, grads = jax.value_and_grad(member_loss)(p, p0, jax.random.fold_in(member_key, k), x, mol, y)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    step = jax.vmap(member_step, in_axes=(0, 0, 0, 0, None, None, None, None))
    return optimizer, jax.jit(step)


def _check_training_set(x: np.ndarray, mol: np.ndarray, n_molecules: int, y: np.ndarray) -> None:
    if x.ndim != 3 or len(mol) != len(x):
        raise ValueError(f"atoms must be (A, C, M) with one molecule index each, got {x.shape} and {mol.shape}")
    if y.shape != (n_molecules,):
        raise ValueError(f"targets must have shape ({n_molecules},), got {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("atom signals or targets have NaN or infinite values")


def train(spec: AtomMLPEnsembleSpec, x: np.ndarray, mol: np.ndarray, n_molecules: int, y: np.ndarray, *,
          member_chunk: int = 10, progress: bool | None = True, description: str | None = None) -> MoleculeEnsemble:
    """Train `spec.members` per-atom MLPs on flat atoms x (A, C, M) of molecules mol (A,) and targets y (N,).

    Member m starts from fold_in(PRNGKey(seed), m) and draws its rotations from a key of its own, so
    members do not depend on how they are chunked.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32).reshape(-1)
    mol = np.asarray(mol, np.int32)
    _check_training_set(x, mol, n_molecules, y)
    l_max = int(round(math.sqrt(x.shape[-1]))) - 1
    n_features = x.shape[1] * x.shape[2]
    optimizer, step = _step_fn(_architecture(spec), int(n_molecules), l_max)
    x_dev, mol_dev, y_dev = jnp.asarray(x), jnp.asarray(mol), jnp.asarray(y)

    def chunk_step(initial):
        frozen = initial if spec.centred else None
        return lambda params, opt_state, keys, k: step(params, opt_state, frozen, keys, k, x_dev, mol_dev, y_dev)

    run = core.train_members(spec.members, spec.steps, spec.seed, member_chunk,
                             jax.jit(jax.vmap(lambda k: init_member(spec, k, n_features))), optimizer, chunk_step,
                             centred=spec.centred, description=description or f"training {spec.label} ensemble",
                             progress=progress)
    return MoleculeEnsemble(spec, (x.shape[1], x.shape[2]), run["params"], run["initial"], run["loss_history"],
                            run["seconds"], run["timing"])


def empirical_ntk(spec: AtomMLPEnsembleSpec, params: list, x, mol, n_molecules: int) -> np.ndarray:
    """Θ(A, B) = Σ_θ ∂F(A)/∂θ ∂F(B)/∂θ of one member, (N, N), for the molecules of x (A, C, M)."""
    jac = jax.jacrev(lambda p: molecule_outputs(spec, p, jnp.asarray(x), jnp.asarray(mol), n_molecules))(params)
    flat = jnp.concatenate([j.reshape(n_molecules, -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
    return np.asarray(flat @ flat.T, np.float64)
