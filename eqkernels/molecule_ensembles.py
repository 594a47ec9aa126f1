"""Deep ensembles of per-atom MLPs on molecules: the finite-width twin of the `mlp` molecule kernel.

One member is a shared per-atom network f applied to every atom's environment signal (real
spherical-harmonic coefficients (C, (L+1)²), flattened to d = C·(L+1)² numbers) and summed over the
atoms of a molecule, F(A) = Σ_{i∈A} f(x_i). f is the MLP of `AtomKernelSpec("mlp")` in the NTK
parametrisation: every parameter is N(0, 1) and each layer computes

    h¹ = σ_w/√d · W⁰ x + σ_b · b⁰,   h^{l+1} = σ_w/√n · W^l φ(h^l) + σ_b · b^l,   f = σ_o/√n · w·φ(h^depth) + σ_ob · b,

with n = `width` hidden units, so as n → ∞ its NTK is the analytic `mlp` per-atom kernel and the NTK
of F is the all-pairs molecule kernel of `eqkernels.molecule_kernel` (checked in the tests).

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
import time as _time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels import store
from eqkernels.errors import ModelFileError
from eqkernels.progress import Meter
from eqkernels.so3 import ACTIVATIONS, AtomKernelSpec, wigner_d

MOLECULE_ENSEMBLE_KIND = "molecule-ensemble"
MOLECULE_ENSEMBLE_SCHEMA = 1


@dataclass(frozen=True)
class AtomMLPEnsembleSpec:
    """Per-atom MLP (the `mlp` kernel's architecture at finite `width`) and how its members are trained."""

    width: int = 64
    depth: int = 1                      # hidden layers, as AtomKernelSpec.depth
    activation: str = "relu"
    weight_std: float = math.sqrt(2.0)
    bias_std: float = 0.1
    readout_weight_std: float = 1.0
    readout_bias_std: float = 0.0
    members: int = 10
    steps: int = 100
    learning_rate: float = 0.01
    augment: bool = False               # a fresh random rotation of every molecule at every step
    centred: bool = False               # members are F(x; θ) − F(x; θ₀)
    seed: int = 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        for name in ("width", "depth", "members"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")

    @classmethod
    def twin_of(cls, kernel_spec: AtomKernelSpec, **kwargs) -> "AtomMLPEnsembleSpec":
        """The finite network of an `mlp` (or `mlp-so3avg`: same network) kernel spec."""
        if kernel_spec.name == "so3gcnn":
            raise ValueError("the finite twin of so3gcnn is not a per-atom MLP")
        return cls(depth=kernel_spec.depth, activation=kernel_spec.activation, weight_std=kernel_spec.weight_std,
                   bias_std=kernel_spec.bias_std, readout_weight_std=kernel_spec.readout_weight_std,
                   readout_bias_std=kernel_spec.readout_bias_std, **kwargs)

    def kernel_spec(self, name: str = "mlp", **kwargs) -> AtomKernelSpec:
        """The infinite-width kernel of this network (`mlp`), or its SO(3) average (`mlp-so3avg`)."""
        return AtomKernelSpec(name, activation=self.activation, depth=self.depth, weight_std=self.weight_std,
                              bias_std=self.bias_std, readout_weight_std=self.readout_weight_std,
                              readout_bias_std=self.readout_bias_std, **kwargs)

    @property
    def label(self) -> str:
        return "mlp" + (" +SO(3) aug" if self.augment else "") + (" centred" if self.centred else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AtomMLPEnsembleSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ensemble options {sorted(unknown)}")
        return cls(**d)


def _architecture(spec: AtomMLPEnsembleSpec) -> AtomMLPEnsembleSpec:
    """Only the fields that fix the network and the step (one compiled function per architecture)."""
    return replace(spec, members=1, steps=0, seed=0)


# ------------------------------------------------------------------------------------------- network

def init_member(spec: AtomMLPEnsembleSpec, key, n_features: int) -> dict:
    """N(0, 1) parameters of one member for inputs of `n_features` = C·(L+1) numbers per atom."""
    keys = jax.random.split(key, 2 * spec.depth + 2)
    params = {"w0": jax.random.normal(keys[0], (n_features, spec.width)),
              "b0": jax.random.normal(keys[1], (spec.width,))}
    for layer in range(1, spec.depth):
        params[f"w{layer}"] = jax.random.normal(keys[2 * layer], (spec.width, spec.width))
        params[f"b{layer}"] = jax.random.normal(keys[2 * layer + 1], (spec.width,))
    params["w_out"] = jax.random.normal(keys[-2], (spec.width,))
    params["b_out"] = jax.random.normal(keys[-1], ())
    return params


def _phi(spec: AtomMLPEnsembleSpec):
    return jax.nn.relu if spec.activation == "relu" else jax.scipy.special.erf


def atom_outputs(spec: AtomMLPEnsembleSpec, params: dict, x) -> jnp.ndarray:
    """f(x_i) of every atom, (A,), for atom signals x (A, C, M) (NTK parametrisation)."""
    phi = _phi(spec)
    flat = x.reshape(x.shape[0], -1)
    h = spec.weight_std / math.sqrt(flat.shape[1]) * flat @ params["w0"] + spec.bias_std * params["b0"]
    for layer in range(1, spec.depth):
        h = (spec.weight_std / math.sqrt(spec.width) * phi(h) @ params[f"w{layer}"]
             + spec.bias_std * params[f"b{layer}"])
    return (spec.readout_weight_std / math.sqrt(spec.width) * phi(h) @ params["w_out"]
            + spec.readout_bias_std * params["b_out"])


def molecule_outputs(spec: AtomMLPEnsembleSpec, params: dict, x, mol, n_molecules: int) -> jnp.ndarray:
    """F(A) = Σ_{i∈A} f(x_i), (N,), for flat atoms x (A, C, M) with molecule index mol (A,).

    Atoms with index −1 (padding) count zero."""
    per_atom = atom_outputs(spec, params, x)
    return jax.ops.segment_sum(jnp.where(mol >= 0, per_atom, 0.0), jnp.maximum(mol, 0), num_segments=n_molecules)


def wigner_blocks(l_max: int, rotations) -> jnp.ndarray:
    """Block-diagonal Wigner matrices (N, (L+1)², (L+1)²) of rotations (N, 3, 3), in JAX (jit-able)."""
    import e3nn_jax as e3nn

    n, m = rotations.shape[0], (l_max + 1) ** 2
    out = jnp.zeros((n, m, m), rotations.dtype)
    for l in range(l_max + 1):
        block = e3nn.Irrep(l, (-1) ** l).D_from_matrix(rotations)
        out = out.at[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2].set(block)
    return out


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
class MoleculeEnsemble:
    """Trained members: parameter dict whose leaves carry a leading member axis."""

    spec: AtomMLPEnsembleSpec
    atom_shape: tuple[int, int]          # (C, M) of one atom signal
    params: Any
    initial_params: Any = None           # θ₀ of centred members, else None
    loss_history: np.ndarray | None = None  # (steps, members): loss before each step
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)

    @property
    def members(self) -> int:
        return int(self.params["w0"].shape[0])

    def select(self, members) -> "MoleculeEnsemble":
        """The sub-ensemble of the given member indices."""
        idx = np.asarray(members, dtype=int)
        pick = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda a: a[idx], tree)  # noqa: E731
        history = None if self.loss_history is None else self.loss_history[:, idx]
        return replace(self, spec=replace(self.spec, members=len(idx)), params=pick(self.params),
                       initial_params=pick(self.initial_params), loss_history=history)

    def outputs(self, x: np.ndarray, mol: np.ndarray, n_molecules: int, *, member_chunk: int = 16) -> np.ndarray:
        """Every member's molecule outputs (M, N), float64, for flat atoms x (A, C, M) sorted by molecule."""
        x = np.asarray(x, np.float32)
        if x.shape[1:] != tuple(self.atom_shape):
            raise ValueError(f"atom signals of shape {x.shape[1:]} do not fit this ensemble's {tuple(self.atom_shape)}")
        fn = _outputs_fn(_architecture(self.spec), int(n_molecules))
        out = []
        for first in range(0, self.members, member_chunk):
            sl = slice(first, first + member_chunk)
            params = jax.tree_util.tree_map(lambda a: a[sl], self.params)
            initial = None if self.initial_params is None else jax.tree_util.tree_map(lambda a: a[sl],
                                                                                     self.initial_params)
            out.append(np.asarray(fn(params, initial, jnp.asarray(x), jnp.asarray(mol, jnp.int32)), np.float64))
        return np.concatenate(out) if out else np.zeros((0, n_molecules))

    def mean(self, x, mol, n_molecules) -> np.ndarray:
        return self.outputs(x, mol, n_molecules).mean(axis=0)

    # ------------------------------------------------------------------------------------ files
    def save(self, path: str | Path, meta: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> Path:
        """HDF5 file (eqkernels.store): parameters by name, spec as JSON; `meta`/`arrays` add task fields."""
        own_meta = {"schema": MOLECULE_ENSEMBLE_SCHEMA, "spec": self.spec.to_dict(),
                    "atom_shape": list(self.atom_shape), "members": self.members, "seconds": self.seconds}
        own_arrays = {f"param_{k}": np.asarray(v) for k, v in self.params.items()}
        if self.initial_params is not None:
            own_arrays.update({f"initial_{k}": np.asarray(v) for k, v in self.initial_params.items()})
        if self.loss_history is not None:
            own_arrays["loss_history"] = np.asarray(self.loss_history, np.float32)
        clash = set(own_meta) & set(meta or {}) | set(own_arrays) & set(arrays or {})
        if clash:
            raise ValueError(f"extra fields {sorted(clash)} clash with the ensemble's own")
        return store.save(path, MOLECULE_ENSEMBLE_KIND, {**own_meta, **(meta or {})}, {**own_arrays, **(arrays or {})})

    @classmethod
    def load(cls, path: str | Path) -> tuple["MoleculeEnsemble", dict, dict[str, np.ndarray]]:
        """(ensemble, meta, arrays); every stored parameter is checked against the architecture."""
        meta, arrays = store.load(path, MOLECULE_ENSEMBLE_KIND)
        if int(meta.get("schema", 0)) > MOLECULE_ENSEMBLE_SCHEMA:
            raise ModelFileError(f"molecule ensemble schema {meta.get('schema')} is newer than this eqkernels "
                                 f"understands ({MOLECULE_ENSEMBLE_SCHEMA}); upgrade eqkernels", path)
        try:
            spec = AtomMLPEnsembleSpec.from_dict(meta["spec"])
            atom_shape = tuple(int(v) for v in meta["atom_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"ensemble file lacks or garbles a field ({type(e).__name__}: {e})", path) from None
        template = jax.eval_shape(lambda k: init_member(spec, k, atom_shape[0] * atom_shape[1]), jax.random.PRNGKey(0))
        trees = {}
        for prefix in ("param", "initial"):
            if not any(name.startswith(prefix + "_") for name in arrays):
                continue
            tree = {}
            for name, leaf in template.items():
                value = arrays.get(f"{prefix}_{name}")
                if value is None or tuple(value.shape[1:]) != tuple(leaf.shape):
                    raise ModelFileError(f"parameter {prefix}_{name} is missing or does not fit the architecture "
                                         f"(expected {tuple(leaf.shape)} per member)", path)
                tree[name] = jnp.asarray(value)
            trees[prefix] = tree
        if "param" not in trees:
            raise ModelFileError("ensemble file holds no parameters", path)
        if spec.centred != ("initial" in trees):
            raise ModelFileError("centred ensemble without its initial parameters (or the reverse)", path)
        if len({a.shape[0] for a in jax.tree_util.tree_leaves(trees)}) != 1:
            raise ModelFileError("parameter arrays disagree on the number of members", path)
        return (cls(spec, atom_shape, trees["param"], trees.get("initial"), arrays.get("loss_history"),
                    float(meta.get("seconds", 0.0))), meta, arrays)


@lru_cache(maxsize=None)
def _outputs_fn(arch: AtomMLPEnsembleSpec, n_molecules: int):
    def member(p, p0, x, mol):
        out = molecule_outputs(arch, p, x, mol, n_molecules)
        if p0 is not None:
            out = out - molecule_outputs(arch, p0, x, mol, n_molecules)
        return out

    return jax.jit(jax.vmap(member, in_axes=(0, 0, None, None)))


@lru_cache(maxsize=None)
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


def train(spec: AtomMLPEnsembleSpec, x: np.ndarray, mol: np.ndarray, n_molecules: int, y: np.ndarray, *,
          member_chunk: int = 10, progress: bool | None = True, description: str | None = None) -> MoleculeEnsemble:
    """Train `spec.members` per-atom MLPs on flat atoms x (A, C, M) of molecules mol (A,) and targets y (N,).

    Member m starts from fold_in(PRNGKey(seed), m) and draws its rotations from a key of its own, so
    members do not depend on how they are chunked.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32).reshape(-1)
    mol = np.asarray(mol, np.int32)
    if x.ndim != 3 or len(mol) != len(x):
        raise ValueError(f"atoms must be (A, C, M) with one molecule index each, got {x.shape} and {mol.shape}")
    if y.shape != (n_molecules,):
        raise ValueError(f"targets must have shape ({n_molecules},), got {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("atom signals or targets have NaN or infinite values")
    l_max = int(round(math.sqrt(x.shape[-1]))) - 1
    n_features = x.shape[1] * x.shape[2]
    optimizer, step = _step_fn(_architecture(spec), int(n_molecules), l_max)
    root = jax.random.PRNGKey(spec.seed)
    data_root = jax.random.fold_in(root, 1 << 30)
    init = jax.jit(jax.vmap(lambda k: init_member(spec, k, n_features)))
    x_dev, mol_dev, y_dev = jnp.asarray(x), jnp.asarray(mol), jnp.asarray(y)
    chunk = max(1, min(member_chunk, spec.members))

    started = _time.perf_counter()
    params_parts, initial_parts, histories = [], [], []
    timing = {"member_chunk": chunk, "first_step_s": None, "step_s": None}
    later_steps, later_seconds = 0, 0.0
    with Meter(spec.members * spec.steps, description or f"training {spec.label} ensemble", unit="member-steps",
               enabled=progress) as meter:
        for first in range(0, spec.members, chunk):
            ids = np.arange(first, min(first + chunk, spec.members))
            ids_padded = np.concatenate([ids, np.full(chunk - len(ids), ids[-1])])  # one compiled shape
            params = init(jax.vmap(lambda m: jax.random.fold_in(root, m))(jnp.asarray(ids_padded)))
            initial = params if spec.centred else None
            opt_state = jax.vmap(optimizer.init)(params)
            keys = jax.vmap(lambda m: jax.random.fold_in(data_root, m))(jnp.asarray(ids_padded))
            losses = []
            jax.block_until_ready(params)
            tick = _time.perf_counter()
            for k in range(spec.steps):
                params, opt_state, loss = step(params, opt_state, initial, keys, jnp.int32(k), x_dev, mol_dev, y_dev)
                losses.append(loss)
                if k == 0 and first == 0:  # the first step compiles: time the others on their own
                    jax.block_until_ready(loss)
                    timing["first_step_s"] = _time.perf_counter() - tick
                    tick = _time.perf_counter()
                if k % 10 == 9 or k == spec.steps - 1:
                    jax.block_until_ready(loss)
                    meter.advance(len(ids) * (10 if k % 10 == 9 else k % 10 + 1))
            jax.block_until_ready(params)
            timed = spec.steps - (1 if first == 0 else 0)
            if timed > 0:
                later_steps, later_seconds = later_steps + timed, later_seconds + _time.perf_counter() - tick
            keep = slice(0, len(ids))
            params_parts.append(jax.tree_util.tree_map(lambda a: a[keep], params))
            if initial is not None:
                initial_parts.append(jax.tree_util.tree_map(lambda a: a[keep], initial))
            histories.append(np.asarray(jnp.stack(losses))[:, keep] if losses else np.zeros((0, len(ids))))
    join = lambda parts: jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)  # noqa: E731
    if later_steps:
        timing["step_s"] = later_seconds / later_steps
    return MoleculeEnsemble(spec, (x.shape[1], x.shape[2]), join(params_parts),
                            join(initial_parts) if initial_parts else None, np.concatenate(histories, axis=1),
                            _time.perf_counter() - started, timing)


def empirical_ntk(spec: AtomMLPEnsembleSpec, params: dict, x, mol, n_molecules: int) -> np.ndarray:
    """Θ(A, B) = Σ_θ ∂F(A)/∂θ ∂F(B)/∂θ of one member, (N, N), for the molecules of x (A, C, M)."""
    jac = jax.jacrev(lambda p: molecule_outputs(spec, p, jnp.asarray(x), jnp.asarray(mol), n_molecules))(params)
    flat = jnp.concatenate([j.reshape(n_molecules, -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
    return np.asarray(flat @ flat.T, np.float64)
