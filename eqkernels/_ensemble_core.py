"""What the image and molecule ensembles share: chunked vmapped training, sub-ensembles and ensemble files.

A domain module (`eqkernels.ensembles`, `eqkernels.molecule_ensembles`) supplies the network (an
nt.stax `init_fn`/`apply_fn` pair) and a compiled step that is vmapped over a chunk of members;
this module runs the members chunk by chunk, keeps their parameters, loss history and timing, and
stores and checks them in files.

Seeds: member m is initialised from fold_in(PRNGKey(seed), m) and draws its minibatches and
rotations from fold_in(fold_in(PRNGKey(seed), 2³⁰), m), so a member does not depend on how members
are chunked.

Files (`eqkernels.store`): every parameter leaf of the member-stacked pytrees is an array
`{tree}_{i:03d}` (tree "param", or "initial" for the frozen θ₀ of centred members), and
meta["parameters"] lists each with its tree path and shape; loading checks every leaf against the
architecture's own `init_fn` (by `jax.eval_shape`), so nothing executable is stored.
"""
from __future__ import annotations

import math
import time as _time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels import store
from eqkernels.errors import ModelFileError
from eqkernels.progress import Meter

ENSEMBLE_FILE_VERSION = 1  # bump when the meaning of stored ensemble fields changes
TREES = ("param", "initial")


def check_schedule(members: int, steps: int, learning_rate: float) -> None:
    """ValueError unless members ≥ 1, steps ≥ 0 and the learning rate is a positive number."""
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")


def member_keys(seed: int, ids) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(initialisation keys, data keys) of members `ids` (n,): fold_in of the seed's root key."""
    root = jax.random.PRNGKey(seed)
    data_root = jax.random.fold_in(root, 1 << 30)
    ids = jnp.asarray(ids)
    return (jax.vmap(lambda m: jax.random.fold_in(root, m))(ids),
            jax.vmap(lambda m: jax.random.fold_in(data_root, m))(ids))


def _run_chunk(step, params, opt_state, keys, steps: int, *, time_first: bool, advance) -> tuple:
    """`steps` calls of `step` on one chunk: (params, (steps, chunk) losses, first step s, later steps s)."""
    losses, first_s = [], None
    jax.block_until_ready(params)
    tick = _time.perf_counter()
    for k in range(steps):
        params, opt_state, loss = step(params, opt_state, keys, jnp.int32(k))
        losses.append(loss)
        if k == 0 and time_first:  # the first step compiles: time the others on their own
            jax.block_until_ready(loss)
            first_s = _time.perf_counter() - tick
            tick = _time.perf_counter()
        if k % 10 == 9 or k == steps - 1:
            jax.block_until_ready(loss)
            advance(10 if k % 10 == 9 else k % 10 + 1)
    jax.block_until_ready(params)
    history = np.asarray(jnp.stack(losses)) if losses else np.zeros((0, len(keys)))
    return params, history, first_s, _time.perf_counter() - tick


def train_members(n_members: int, steps: int, seed: int, chunk: int, init_members: Callable, optimizer,
                  chunk_step: Callable, *, centred: bool, description: str, progress: bool | None) -> dict:
    """Train `n_members` members, `chunk` at a time (the last chunk padded with repeats: one compiled shape).

    init_members(keys (chunk, 2)) → member-stacked parameters; chunk_step(θ₀) → step(params,
    opt_state, data keys (chunk, 2), k) → (params, opt_state, loss (chunk,)), the compiled step of a
    chunk whose members started at θ₀. Returns {params, initial (θ₀ of centred members, else None),
    loss_history (steps, members), seconds, timing {member_chunk, first_step_s, step_s}}.
    """
    chunk = max(1, min(chunk, n_members))
    started = _time.perf_counter()
    parts = {"param": [], "initial": [], "history": []}
    timing = {"member_chunk": chunk, "first_step_s": None, "step_s": None}
    later_steps, later_seconds = 0, 0.0
    with Meter(n_members * steps, description, unit="member-steps", enabled=progress) as meter:
        for first in range(0, n_members, chunk):
            ids = np.arange(first, min(first + chunk, n_members))
            init_keys, data_keys = member_keys(seed, np.concatenate([ids, np.full(chunk - len(ids), ids[-1])]))
            initial = init_members(init_keys)
            params, history, first_s, seconds = _run_chunk(
                chunk_step(initial), initial, jax.vmap(optimizer.init)(initial), data_keys, steps,
                time_first=first == 0, advance=lambda n, m=len(ids): meter.advance(m * n))
            if first == 0:
                timing["first_step_s"] = first_s
            timed = steps - (1 if first == 0 else 0)
            if timed > 0:
                later_steps, later_seconds = later_steps + timed, later_seconds + seconds
            keep = slice(0, len(ids))
            parts["param"].append(jax.tree_util.tree_map(lambda a: a[keep], params))
            if centred:
                parts["initial"].append(jax.tree_util.tree_map(lambda a: a[keep], initial))
            parts["history"].append(history[:, keep])
    if later_steps:
        timing["step_s"] = later_seconds / later_steps  # one compiled step of `member_chunk` members
    join = lambda trees: jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *trees)  # noqa: E731
    return {"params": join(parts["param"]), "initial": join(parts["initial"]) if centred else None,
            "loss_history": np.concatenate(parts["history"], axis=1), "seconds": _time.perf_counter() - started,
            "timing": timing}


class MemberEnsemble:
    """Methods of an ensemble dataclass with fields spec (with `members`), params, initial_params, loss_history."""

    spec: Any
    params: Any
    initial_params: Any
    loss_history: np.ndarray | None

    @property
    def members(self) -> int:
        return int(jax.tree_util.tree_leaves(self.params)[0].shape[0])

    def select(self, members):
        """The sub-ensemble of the given member indices."""
        idx = np.asarray(members, dtype=int)
        pick = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda a: a[idx], tree)  # noqa: E731
        history = None if self.loss_history is None else self.loss_history[:, idx]
        return replace(self, spec=replace(self.spec, members=len(idx)), params=pick(self.params),
                       initial_params=pick(self.initial_params), loss_history=history)

    def parameter_arrays(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        """(meta["parameters"] entries, arrays): every leaf under its tree path, plus the loss history."""
        entries, arrays = [], {}
        trees = [("param", self.params)] + ([("initial", self.initial_params)] if self.initial_params is not None else [])
        for prefix, tree in trees:
            for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
                name = f"{prefix}_{i:03d}"
                arrays[name] = np.asarray(leaf)
                entries.append({"name": name, "tree": prefix, "path": jax.tree_util.keystr(path),
                                "shape": list(np.shape(leaf))})
        if self.loss_history is not None:
            arrays["loss_history"] = np.asarray(self.loss_history, dtype=np.float32)
        return entries, arrays


def save_with_extras(path: str | Path, kind: str, own_meta: dict, own_arrays: dict, meta: dict | None,
                     arrays: dict | None) -> Path:
    """store.save of an ensemble's own fields plus a task's `meta`/`arrays`, refusing names that clash."""
    clash = set(own_meta) & set(meta or {}) | set(own_arrays) & set(arrays or {})
    if clash:
        raise ValueError(f"extra fields {sorted(clash)} clash with the ensemble's own")
    return store.save(path, kind, {**own_meta, **(meta or {})}, {**own_arrays, **(arrays or {})},
                      version=ENSEMBLE_FILE_VERSION)


def _stored_tree(template, entries: list[dict], arrays: dict, prefix: str, path) -> Any:
    """The `prefix` tree from stored leaves, each checked against the template's path and shape."""
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    if len(entries) != len(leaves):
        raise ModelFileError(f"ensemble file has {len(entries)} {prefix} arrays, the architecture needs "
                             f"{len(leaves)}", path)
    values = []
    for entry, (tree_path, leaf) in zip(entries, leaves):
        value = arrays.get(entry["name"])
        if entry["path"] != jax.tree_util.keystr(tree_path) or value is None \
                or tuple(value.shape[1:]) != tuple(leaf.shape):
            raise ModelFileError(f"parameter {entry['name']} ({entry['path']}) does not fit the "
                                 f"architecture (expected {jax.tree_util.keystr(tree_path)} {leaf.shape})", path)
        values.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), values)


def stored_trees(meta: dict, arrays: dict, template, centred: bool, path: str | Path = "") -> dict:
    """{"param": tree, "initial": tree or None} from a file's meta and arrays, checked against `template`
    (one member's parameters, e.g. `jax.eval_shape` of the init_fn), centring and member counts.
    The caller checks meta's version (`store.check_version`) before it reads the spec."""
    try:
        entries = [dict(e) for e in meta["parameters"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"ensemble file lacks or garbles a field ({type(e).__name__}: {e})", path) from None
    trees = {prefix: _stored_tree(template, mine, arrays, prefix, path)
             for prefix in TREES if (mine := [e for e in entries if e.get("tree") == prefix])}
    if "param" not in trees:
        raise ModelFileError("ensemble file holds no parameters", path)
    if centred != ("initial" in trees):
        raise ModelFileError("centred ensemble without its initial parameters (or the reverse)", path)
    sizes = {a.shape[0] for a in jax.tree_util.tree_leaves(trees)}
    if len(sizes) != 1:
        raise ModelFileError(f"parameter arrays disagree on the number of members ({sorted(sizes)})", path)
    return {"param": trees["param"], "initial": trees.get("initial")}
