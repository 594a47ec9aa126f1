"""Deep ensembles of finite-width networks, all members trained together in JAX.

The members share one architecture, the finite twin of an eqkernels kernel (the plain CNN of a
`ConvNetSpec`, or its GCNN over C4/D4), in the NTK parametrisation, and one training set; they
differ in their initialisation and, with SGD, in their minibatches. One jit-compiled step, vmapped
over the member axis, trains every member at once.

Time convention. The loss is ½ Σ_i ‖f(x_i) − y_i‖², summed over the training inputs as in
`eqkernels.solvers`, so after k full-batch gradient-descent steps at learning rate η the mean of
an infinitely wide, infinitely large ensemble is

    μ_k(x) = Θ(x, X) Θ⁻¹ (I − (I − ηΘ)^k) Y     (`dual_coefficients(..., time=k, discrete=True)`).

A minibatch of B of the N training inputs is weighted by N/B, an unbiased estimate of the full
loss, so an SGD step has the size of a gradient-descent step on average.

Augmentation. With `augment="C4"` (or "D4") the training set is every input in all |G| of its
transformed copies, targets repeated. On targets that are constant over each orbit the kernel
matrix of that set acts as |G|·Θ_avg, where Θ_avg(x, x′) = 1/|G| Σ_g Θ(x, g·x′) is the averaged
kernel (`cnn-c4avg`), because the CNN kernel is jointly invariant, Θ(g·x, g·x′) = Θ(x, x′). So
an augmented ensemble at learning rate η/|G| has the mean prediction of the averaged kernel at
learning rate η (`kernel_learning_rate`), and this mean is exactly invariant (Gerken & Kessel 2024).

Rotations off the grid (`augment="C8"`, "C16", "D8", …): at every step each training input is
replaced by P_g x for a fresh uniformly drawn g (the interpolated rotations of
`eqkernels.groups.rotation_group`, the maps the `cnn-c8avg` kernels average over). Because g is
drawn independently of the current parameters, the expected update is the gradient of
1/|G| Σ_g Σ_i ½‖f(P_g x_i) − y_i‖², i.e. full-orbit training at η/|G|; so such an ensemble at η
is on the kernel time of the averaged kernel at η (orbit_size 1). With interpolation the orbit
Gram matrix no longer maps orbit-constant targets to orbit-constant ones exactly (P_g P_h ≠ P_gh),
so the averaged kernel is this ensemble's limit only up to the interpolation's composition defect.

Centred networks. A finite ensemble's mean also carries the members' random initial functions
f(·; θ₀), which average out only as 1/√members and hide the effect of the width. With
`centred=True` every member is the centred network f(x; θ) − f(x; θ₀) (θ₀ frozen, kept with the
parameters): it starts at f ≡ 0, and in the wide (linearised) regime its trajectory is fixed by
its empirical NTK alone, so the ensemble mean approaches μ_k as the width grows, whatever the
number of members. It costs one more forward pass per prediction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels import _ensemble_core as core
from eqkernels import store
from eqkernels.errors import ModelFileError
from eqkernels.groups import RotationGroup, get_group, resolve_group
from eqkernels.kernels.spec import ConvNetSpec

ENSEMBLE_KIND = "ensemble"
ENSEMBLE_SCHEMA = core.ENSEMBLE_FILE_VERSION  # the version of stored ensemble fields, shared by both domains
# Compiled functions kept per architecture (networks, outputs, steps): enough for a width study.
CACHED_ARCHITECTURES = 32
ARCHITECTURES = ("cnn", "gcnn")
# Memory allowed for the activations of one training step (all members of a chunk together).
TRAIN_MEMORY_BYTES = 2 << 30


@dataclass(frozen=True)
class EnsembleSpec:
    """What to train: architecture and width (`net.channels`), schedule, augmentation, centring."""

    net: ConvNetSpec = field(default_factory=ConvNetSpec)
    architecture: str = "cnn"          # "cnn", or "gcnn" (group convolutions over `group`)
    group: str | None = None           # the GCNN's group (C4, D4); None for the CNN
    n_outputs: int = 1
    members: int = 10
    steps: int = 100
    learning_rate: float = 0.01
    batch_size: int | None = None      # None: full-batch gradient descent; else SGD minibatches
    augment: str | None = None         # a group name: train on every input's full orbit
    centred: bool = False              # members are f(x; θ) − f(x; θ₀)
    seed: int = 0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "gcnn":
            if self.group is None:
                raise ValueError("a GCNN ensemble needs its group (C4 or D4)")
            get_group(self.group)
        elif self.group is not None:
            raise ValueError("only GCNN ensembles take a group; use `augment` for augmented CNNs")
        if self.augment is not None:
            group = resolve_group(self.augment)
            # Off-grid groups must contain the quarter turns (C8 = C4·{0°, 45°}, …): the comparisons'
            # orbit and sweep computations rely on that exact part.
            if isinstance(group, RotationGroup) and group.exact.order != (8 if group.name[0] == "D" else 4):
                raise ValueError(f"augmentation by {group.name} needs n divisible by 4 (C4/D4 inside it), "
                                 f"e.g. C8, C16, D8")
        if self.n_outputs < 1:
            raise ValueError(f"n_outputs must be >= 1, got {self.n_outputs}")
        core.check_schedule(self.members, self.steps, self.learning_rate)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def label(self) -> str:
        """Short name for tables: e.g. `cnn`, `cnn +C4 aug`, `gcnn C4`, `cnn centred`."""
        name = self.architecture if self.group is None else f"{self.architecture} {self.group}"
        if self.augment:
            name += f" +{self.augment} aug"
        return name + (" centred" if self.centred else "")

    @property
    def random_augment(self) -> bool:
        """True for a fresh interpolated rotation per step (C8, C16, D8, …) instead of the full orbit."""
        return self.augment is not None and isinstance(resolve_group(self.augment), RotationGroup)

    @property
    def orbit_size(self) -> int:
        """How many copies of each training input the network sees per step (|G| with full-orbit
        augmentation, 1 without augmentation or with a fresh random rotation per step)."""
        return get_group(self.augment).order if self.augment and not self.random_augment else 1

    def to_dict(self) -> dict:
        return {**asdict(self), "net": asdict(self.net)}

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleSpec":
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ensemble options {sorted(unknown)}")
        net = dict(d.pop("net", {}))
        unknown = set(net) - set(ConvNetSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown network options {sorted(unknown)}")
        return cls(net=ConvNetSpec(**net), **d)


def kernel_learning_rate(spec: EnsembleSpec) -> float:
    """The learning rate η of the kernel mean prediction μ_k that this ensemble follows.

    η = the ensemble's own rate times |G| for augmented training (see the module docstring),
    used with the averaged kernel; otherwise the rate itself, with the network's own kernel.
    """
    return spec.learning_rate * spec.orbit_size


# ----------------------------------------------------------------------------------------- networks

def _architecture(spec: EnsembleSpec) -> EnsembleSpec:
    """The fields that fix the network, others at their defaults: one cache entry per architecture."""
    return EnsembleSpec(net=spec.net, architecture=spec.architecture, group=spec.group, n_outputs=spec.n_outputs)


def network(spec: EnsembleSpec):
    """(init_fn, apply_fn) of one member (nt stax conventions: inputs (N, H, W, C) → (N, n_outputs))."""
    return _network(_architecture(spec))


@lru_cache(maxsize=CACHED_ARCHITECTURES)
def _network(spec: EnsembleSpec):
    from eqkernels.layers.planar import cnn_stax, gcnn_stax

    if spec.architecture == "cnn":
        init_fn, apply_fn, _ = cnn_stax(spec.net, readout_width=spec.n_outputs)
    else:
        init_fn, apply_fn, _ = gcnn_stax(spec.net, spec.group, readout_width=spec.n_outputs)
    return init_fn, apply_fn


def _activation_floats(spec: EnsembleSpec, input_shape: tuple[int, ...]) -> int:
    """Floats of hidden activations per input (for chunk sizes)."""
    net = spec.net
    size = input_shape[0]
    copies = get_group(spec.group).order if spec.group else 1
    total = 0
    for layer in range(1, net.depth + 1):
        side = size - layer * (net.filter_size - 1) if net.padding == "VALID" else size
        total += max(side, 1) ** 2 * net.channels * copies
    return total + input_shape[0] * input_shape[1] * input_shape[-1]


def _member_outputs_fn(spec: EnsembleSpec):
    """jit: (params (M,…), initial params or None, x (N, …)) → (M, N, n_outputs)."""
    return _outputs_fn(_architecture(spec))


@lru_cache(maxsize=CACHED_ARCHITECTURES)
def _outputs_fn(spec: EnsembleSpec):
    _, apply_fn = network(spec)

    def outputs(params, initial, x):
        out = jax.vmap(apply_fn, in_axes=(0, None))(params, x)
        if initial is not None:
            out = out - jax.vmap(apply_fn, in_axes=(0, None))(initial, x)
        return out

    return jax.jit(outputs)


# ----------------------------------------------------------------------------------------- ensembles

@dataclass
class Ensemble(core.MemberEnsemble):
    """Trained members: parameter pytree with a leading member axis on every leaf."""

    spec: EnsembleSpec
    input_shape: tuple[int, ...]          # one input, e.g. (H, W, C)
    params: Any
    initial_params: Any = None            # θ₀ of centred members (same layout), else None
    loss_history: np.ndarray | None = None  # (steps, M): training loss before each step
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)  # member_chunk, first_step_s (with compilation), step_s

    def outputs(self, inputs, *, chunk: int | None = None) -> np.ndarray:
        """Every member's outputs (M, N, n_outputs) for inputs (N, H, W, C), in float64."""
        x = np.asarray(inputs, dtype=np.float32)
        if x.shape[1:] != tuple(self.input_shape):
            raise ValueError(f"inputs of shape {x.shape[1:]} do not fit this ensemble's {tuple(self.input_shape)}")
        if chunk is None:
            per_input = 4 * 3 * self.members * _activation_floats(self.spec, self.input_shape)
            chunk = int(max(8, min(512, TRAIN_MEMORY_BYTES // max(per_input, 1))))
        fn = _member_outputs_fn(self.spec)
        out = []
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            pad = chunk - len(part) if len(x) > chunk else 0  # one compiled shape for every chunk
            if pad:
                part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
            res = np.asarray(fn(self.params, self.initial_params, part), dtype=np.float64)
            out.append(res[:, :len(res[0]) - pad] if pad else res)
        if not out:
            return np.zeros((self.members, 0, self.spec.n_outputs))
        return np.concatenate(out, axis=1)

    def mean(self, inputs, **kwargs) -> np.ndarray:
        """Ensemble mean prediction (N, n_outputs)."""
        return self.outputs(inputs, **kwargs).mean(axis=0)

    # ----------------------------------------------------------------------------------- files
    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(meta, arrays): every parameter leaf flattened under its tree path, nothing executable."""
        entries, arrays = self.parameter_arrays()
        meta = {"spec": self.spec.to_dict(), "input_shape": list(self.input_shape), "members": self.members,
                "seconds": self.seconds, "parameters": entries}
        return meta, arrays

    def save(self, path: str | Path, meta: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> Path:
        """Write an HDF5 ensemble file; `meta`/`arrays` add task-specific fields (e.g. preprocessing)."""
        return core.save_with_extras(path, ENSEMBLE_KIND, *self.to_arrays(), meta, arrays)

    @classmethod
    def from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray], path: str | Path = "") -> "Ensemble":
        """Rebuild from `to_arrays` output, checking every stored leaf against the architecture."""
        store.check_version(meta, ENSEMBLE_SCHEMA, path, label="ensemble")
        try:
            spec = EnsembleSpec.from_dict(meta["spec"])
            input_shape = tuple(int(v) for v in meta["input_shape"])
            init_fn, _ = network(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"ensemble file lacks or garbles a field ({type(e).__name__}: {e})", path) from None
        template = jax.eval_shape(lambda k: init_fn(k, (1,) + input_shape)[1], jax.random.PRNGKey(0))
        trees = core.stored_trees(meta, arrays, template, spec.centred, path)
        return cls(spec, input_shape, trees["param"], trees["initial"], arrays.get("loss_history"),
                   float(meta.get("seconds", 0.0)))

    @classmethod
    def load(cls, path: str | Path) -> tuple["Ensemble", dict, dict[str, np.ndarray]]:
        """(ensemble, meta, arrays) from an ensemble file; meta and arrays include the task's fields."""
        meta, arrays = store.load(path, ENSEMBLE_KIND)
        return cls.from_arrays(meta, arrays, path), meta, arrays


def augmented(inputs: np.ndarray, targets: np.ndarray, group: str) -> tuple[np.ndarray, np.ndarray]:
    """Every input in all |G| transformed copies (element-major), targets repeated: (|G|·N, …)."""
    g = get_group(group)
    x = g.orbit(np.asarray(inputs))
    return x.reshape((-1,) + x.shape[2:]), np.tile(np.asarray(targets), (g.order,) + (1,) * (np.ndim(targets) - 1))


def augment_inputs(key, x, matrices):
    """x (N, S, S, C) with each input moved by P_g, g drawn uniformly per input: (moved, g (N,)).

    `matrices` (|G|, S², S²) from `RotationGroup.matrices`, so the moves are exactly the group's `act`.
    """
    n, size = x.shape[0], x.shape[1]
    g = jax.random.randint(key, (n,), 0, matrices.shape[0])
    flat = x.reshape(n, size * size, x.shape[-1])
    return jnp.einsum("npq,nqc->npc", matrices[g], flat).reshape(x.shape), g


def _make_step(spec: EnsembleSpec, n_train: int, shared_targets: bool):
    """(optimizer, one jit-compiled training step for a chunk of members, vmapped over members)."""
    # Cached without the fields the step does not depend on, so ensembles that differ only in
    # members, steps or seed (and a timing run before the real one) share the compiled step.
    return _step_fn(replace(spec, members=1, steps=0, seed=0), n_train, shared_targets)


@lru_cache(maxsize=CACHED_ARCHITECTURES)
def _step_fn(spec: EnsembleSpec, n_train: int, shared_targets: bool):
    import optax

    _, apply_fn = network(spec)
    optimizer = optax.sgd(spec.learning_rate)
    batch = spec.batch_size
    weight = 1.0 if batch is None else n_train / batch  # unbiased estimate of the summed loss

    def member_loss(p, x, y):
        return 0.5 * weight * jnp.sum((apply_fn(p, x) - y) ** 2)

    def member_step(p, opt_state, member_key, k, x_all, y_all, matrices):
        key = jax.random.fold_in(member_key, k)
        if batch is None:
            x, y = x_all, y_all
        else:
            idx = jax.random.choice(key, n_train, (batch,), replace=False)
            x, y = x_all[idx], y_all[idx]
        if matrices is not None:  # a fresh interpolated rotation of every input, every step
            x = augment_inputs(jax.random.fold_in(key, 1), x, matrices)[0]
        loss, grads = jax.value_and_grad(member_loss)(p, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    step = jax.vmap(member_step, in_axes=(0, 0, 0, None, None, None if shared_targets else 0, None))
    return optimizer, jax.jit(step)


def default_member_chunk(spec: EnsembleSpec, input_shape: tuple[int, ...], n_train: int) -> int:
    """Members per compiled step so that one step's activations stay within TRAIN_MEMORY_BYTES."""
    per_member = 4 * 4 * (spec.batch_size or n_train) * _activation_floats(spec, input_shape)
    return int(max(1, min(spec.members, TRAIN_MEMORY_BYTES // max(per_member, 1))))


def train(spec: EnsembleSpec, inputs: np.ndarray, targets: np.ndarray, *, member_chunk: int | None = None,
          progress: bool | None = True, description: str | None = None) -> Ensemble:
    """Train `spec.members` networks on inputs (N, H, W, C) and targets (N, n_outputs).

    Member m is initialised from fold_in(PRNGKey(seed), m), so it does not depend on how members
    are chunked. Members are trained `member_chunk` at a time (default: as many as fit in memory).
    """
    x = np.asarray(inputs, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"inputs must be square images (N, S, S, C), got {x.shape}")
    if y.shape != (len(x), spec.n_outputs):
        raise ValueError(f"targets must have shape ({len(x)}, {spec.n_outputs}), got {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("inputs or targets have NaN or infinite values")
    spec.net.check_input_size(x.shape[1])
    matrices = None
    if spec.random_augment:
        group = resolve_group(spec.augment)
        group.check_size(x.shape[1])
        matrices = jnp.asarray(group.matrices(x.shape[1]))
    elif spec.augment:
        x, y = augmented(x, y, spec.augment)
    return _train_members(spec, x, y, matrices, member_chunk, progress, description)


def _train_members(spec: EnsembleSpec, x: np.ndarray, y: np.ndarray, matrices, member_chunk: int | None,
                   progress: bool | None, description: str | None) -> Ensemble:
    """`train` on the checked (and, with full-orbit augmentation, expanded) training set x (N, S, S, C)."""
    n_train, input_shape = len(x), tuple(x.shape[1:])
    if spec.batch_size is not None and spec.batch_size > n_train:
        raise ValueError(f"batch_size {spec.batch_size} exceeds the {n_train} training inputs")
    init_fn, _ = network(spec)
    optimizer, step = _make_step(spec, n_train, shared_targets=not spec.centred)
    x_dev, y_base = jnp.asarray(x), jnp.asarray(y)

    def chunk_step(initial):
        # f(x; θ) − f(x; θ₀) → y  ⇔  f(x; θ) → y + f(x; θ₀): shift each centred member's targets once.
        y_dev = y_base[None] + _member_outputs_fn(spec)(initial, None, x_dev) if spec.centred else y_base
        return lambda params, opt_state, keys, k: step(params, opt_state, keys, k, x_dev, y_dev, matrices)

    run = core.train_members(spec.members, spec.steps, spec.seed,
                             member_chunk or default_member_chunk(spec, input_shape, n_train),
                             jax.jit(jax.vmap(lambda k: init_fn(k, (1,) + input_shape)[1])), optimizer, chunk_step,
                             centred=spec.centred, description=description or f"training {spec.label} ensemble",
                             progress=progress)
    return Ensemble(spec, input_shape, run["params"], run["initial"], run["loss_history"], run["seconds"],
                    run["timing"])


def size_curve(member_outputs: np.ndarray, sizes, measure, *, max_subsets: int = 10) -> dict:
    """A measure of the ensemble mean for several ensemble sizes, from one pool of members.

    `member_outputs` (M, …): each member's outputs; `measure(mean_outputs) → float`. For each size
    m ≤ M the pool is cut into ⌊M/m⌋ disjoint ensembles (at most `max_subsets`), and the measure's
    mean and standard deviation over them are returned: {"sizes", "mean", "std", "subsets"}.
    """
    out = np.asarray(member_outputs)
    result = {"sizes": [], "mean": [], "std": [], "subsets": []}
    for m in sorted(set(int(s) for s in sizes)):
        if m < 1 or m > len(out):
            continue
        n_sub = min(len(out) // m, max_subsets)
        values = [measure(out[i * m:(i + 1) * m].mean(axis=0)) for i in range(n_sub)]
        result["sizes"].append(m)
        result["mean"].append(float(np.mean(values)))
        result["std"].append(float(np.std(values)))
        result["subsets"].append(n_sub)
    return result
