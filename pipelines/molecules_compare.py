"""Emergent invariance on molecules: deep ensembles of per-atom MLPs and the SO(3) kernels side by side.

The molecule counterpart of `histology_compare`. On one split of a QM9-style data set (U0 in meV,
minus the atom reference energies and a per-element linear fit on the training molecules, as in
`eqkernels.pipelines.molecules`) it compares

- kernels (infinitely wide, infinitely many members): the per-atom `mlp` NTK summed over atom pairs,
  its SO(3) average `mlp-so3avg` (the infinite rotation-augmented ensemble) and the SO(3) GCNN NTK
  `so3gcnn`, each as the mean prediction μ_k after the same k gradient-descent steps as the networks;
- finite ensembles of the per-atom MLP (`eqkernels.molecule_ensembles`, the exact finite twin of the
  `mlp` kernel) without augmentation and with a fresh random rotation of every molecule at every step,
  trained with the same k steps at the same η;

and measures, per model: MAE on held-out molecules, on randomly rotated copies of them and on
out-of-distribution molecules (by default the largest molecules of the data, which are kept out of
training and test), the invariance error of the (ensemble) mean under random rotations, and the
distance of the ensemble mean to the matching kernel's μ_k; curves over the number of members; and
a width study in which centred networks approach μ_k as the width grows.

All networks and kernels work on targets divided by their standard deviation on the training
molecules (σ_y); MAEs are reported in meV, invariance errors in units of σ_y.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from eqkernels import metrics
from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
from eqkernels.errors import InputError
from eqkernels.molecule_ensembles import AtomMLPEnsembleSpec, MoleculeEnsemble, rotate_molecules, train
from eqkernels.molecule_kernel import MoleculeKernel
from eqkernels.pipelines.molecules import Atoms, atom_features
from eqkernels.pipelines.compare import CompareAdapter, CompareSizes, WidthSubset
from eqkernels.pipelines.molecules_ensemble import TARGET, UNIT, EnsembleFile, ensemble_meta
from eqkernels.pipelines.compare_report import (errorbar_curve, format_value as _fmt, markdown_table as _table,
                                                  member_curve_tables, plot_width_study, save_figure, sqrt_members_guide,
                                                  timing_lines, width_study_line, width_study_table)
from eqkernels.solvers import dual_coefficients
from eqkernels.so3 import DEFAULT_QUADRATURE_DEGREE, AtomKernelSpec, quadrature_error, random_rotations

KERNELS = ("mlp", "mlp-so3avg", "so3gcnn")
POOLS = {"mlp": "mlp", "mlp-aug": "mlp-so3avg"}   # ensemble pool → the kernel whose μ_k its mean approaches


@dataclass
class MoleculeCompareConfig(CompareSizes):
    """Sizes of one molecule comparison on 2 CPU cores: 7 min 42 s at the default quadrature degree 17
    (measured 2026-12-02), about 3 minutes at degree 5; `--quadrature-degree 7` is the speed option."""

    n_train: int = 100             # training molecules (random among all but the OOD ones)
    n_test: int = 200              # held-out molecules
    n_ood: int = 100               # the largest molecules, kept out of training and test (0: none)
    width: int = 64                # hidden units of the per-atom MLP
    steps: int = 150               # full-batch gradient-descent steps
    lr_scale: float = 1.0          # η = lr_scale / λ_max(Θ_mlp(X, X))
    members: int = 8               # members of one ensemble
    seeds: int = 3                 # independent ensembles per model
    curve_sizes: tuple = (1, 2, 4, 8, 16, 24)
    rotations: int = 3             # random rotations per molecule for the invariance error
    centred: bool = True           # compared ensembles are centred networks F(x;θ) − F(x;θ₀) (see `markdown`)
    widths: tuple = (32, 64, 128, 256)  # width study (centred MLPs, no augmentation)
    width_members: int = 2
    width_n_train: int = 20
    quadrature_degree: int = DEFAULT_QUADRATURE_DEGREE  # SO(3) quadrature of mlp-so3avg and so3gcnn (lower: speed option)
    split_seed: int = 0
    member_chunk: int = 10

    def __post_init__(self):
        self.check_sizes(("n_train", "n_test", "width", "members", "seeds", "rotations", "width_members",
                          "width_n_train", "quadrature_degree", "member_chunk"))


# ------------------------------------------------------------------------------------------------- data

@dataclass
class Inputs:
    """Features and targets of one run. Copies: index 0 = as given, then `rotations` random rotations."""

    env_spec: EnvironmentSpec
    channel_scale: np.ndarray
    l0_mean: np.ndarray
    element_coef: np.ndarray
    atomrefs: dict
    y_scale: float                           # σ_y (meV): networks and kernels learn y / σ_y
    train: Atoms
    y_train: np.ndarray                      # (N,) residual targets / σ_y
    sets: dict[str, list[Atoms]]             # name → [copy 0, rotated copies…]; "test" first
    residuals: dict[str, np.ndarray]         # name → residual targets (meV) of the set
    descriptions: dict[str, str] = field(default_factory=dict)
    max_train_atoms: int = 0


def _read_molecules(config: MoleculeCompareConfig, data, ood, env: EnvironmentSpec) -> tuple:
    """(data path, all molecules, indices open to training and test, OOD molecules or None, OOD note)."""
    from eqkernels.pipelines import molecules as mp

    data_path = Path(data) if data is not None else mp.default_data_path()
    mols = mp.load_molecules(data_path)
    mp.check_molecules(mols, env.elements, path=data_path)
    if TARGET not in mols.properties or not np.all(np.isfinite(mols.properties[TARGET])):
        raise InputError(f"the data has no (or missing) {TARGET!r} values", data_path)
    ood_mols, ood_note = None, ""
    pool = np.arange(len(mols))
    if ood is not None:
        ood_mols = mp.load_molecules(ood)
        mp.check_molecules(ood_mols, env.elements, path=ood)
        if TARGET not in ood_mols.properties:
            raise InputError(f"the OOD molecules have no {TARGET!r} values", ood)
        if config.n_ood and len(ood_mols) > config.n_ood:
            ood_mols = ood_mols.subset(np.arange(config.n_ood))
        ood_note = f"{len(ood_mols)} molecules of {Path(ood).name}"
    elif config.n_ood:
        if config.n_ood + config.n_train + 1 > len(mols):
            raise InputError(f"--n-ood {config.n_ood} and --n-train {config.n_train} leave no test molecules of "
                             f"{len(mols)}", data_path)
        # The largest molecules (most atoms, then most heavy atoms) are held out: a shift in size.
        heavy = np.array([np.sum(z > 1) for z in mols.numbers])
        order = np.lexsort((heavy, mols.n_atoms))[::-1]
        ood_idx = np.sort(order[:config.n_ood])
        pool = np.setdiff1d(pool, ood_idx)
        ood_mols = mols.subset(ood_idx)
    if config.n_train + 1 > len(pool):
        raise InputError(f"--n-train {config.n_train} leaves no held-out molecules of {len(pool)}", data_path)
    return data_path, mols, pool, ood_mols, ood_note


def _rotated_copies(config: MoleculeCompareConfig, base: Atoms, k: int) -> list[Atoms]:
    """[base, then `rotations` randomly rotated copies of it] for the k-th evaluation set."""
    copies = [base]
    for r in range(config.rotations):
        rot = random_rotations(base.n, seed=config.split_seed * 1000 + 100 * k + r + 1)
        copies.append(Atoms(rotate_molecules(base.x, base.mol, rot), base.mol, base.n))
    return copies


def _set_descriptions(data_path: Path, test_mols, ood_mols, ood_note: str, n_max: int) -> dict[str, str]:
    descriptions = {"test": f"{len(test_mols)} held-out molecules of {data_path.name} "
                            f"({int(test_mols.n_atoms.min())}–{int(test_mols.n_atoms.max())} atoms)"}
    if ood_mols is not None:
        descriptions["ood"] = (ood_note or f"the {len(ood_mols)} largest molecules of {data_path.name}, kept out of "
                               f"training and test") + (f" ({int(ood_mols.n_atoms.min())}–{int(ood_mols.n_atoms.max())} "
                                                        f"atoms; training molecules have at most {n_max})")
    return descriptions


def load_inputs(config: MoleculeCompareConfig, data=None, ood=None) -> Inputs:
    """Split, featurise, fit the baseline (atom references + element fit), rotate copies."""
    from eqkernels.pipelines import molecules as mp

    env = EnvironmentSpec()
    data_path, mols, pool, ood_mols, ood_note = _read_molecules(config, data, ood, env)
    train_local, test_local = mp.split_indices(len(pool), config.n_train, min(config.n_test, len(pool) - config.n_train),
                                               seed=config.split_seed)
    train_mols, test_mols = mols.subset(pool[train_local]), mols.subset(pool[test_local])

    def residual(m):
        y = mp.convert_units(m.properties[TARGET], mp.NATIVE_UNITS[TARGET], UNIT)
        return y - m.element_counts(env.elements) @ refs

    refs_ha = mp.atom_references()[TARGET]
    atomrefs = {z: float(mp.convert_units(refs_ha[z], "Ha", UNIT)) for z in env.elements}
    refs = np.array([atomrefs[z] for z in env.elements])
    counts = train_mols.element_counts(env.elements)
    y = residual(train_mols)
    element_coef = np.linalg.solve(counts.T @ counts + 1e-8 * np.eye(counts.shape[1]), counts.T @ y)
    res_train = y - counts @ element_coef
    y_scale = float(np.std(res_train)) or 1.0

    x, mol = atom_environments(env, train_mols.numbers, train_mols.positions)
    scale = channel_scales(env, x)
    l0 = np.mean(x[:, :, 0] * scale[None, :], axis=0)
    named = {"test": test_mols} | ({"ood": ood_mols} if ood_mols is not None else {})
    sets = {name: _rotated_copies(config, atom_features(env, m, scale, l0), k) for k, (name, m) in enumerate(named.items())}
    residuals = {name: residual(m) - m.element_counts(env.elements) @ element_coef for name, m in named.items()}
    n_max = int(train_mols.n_atoms.max())
    return Inputs(env, scale, l0, element_coef, atomrefs, y_scale, atom_features(env, train_mols, scale, l0),
                  res_train / y_scale, sets, residuals, _set_descriptions(data_path, test_mols, ood_mols, ood_note, n_max),
                  n_max)

# --------------------------------------------------------------------------------------------- measures

def measure(copies: dict[str, np.ndarray], inputs: Inputs, reference: dict[str, np.ndarray] | None = None) -> dict:
    """Measures of one predictor from its outputs (in units of σ_y) on every set's copies, {set: (R+1, N)}.

    `reference`: the matching kernel's μ_k on the same copies, for the distance to it.
    """
    out = {}
    s = inputs.y_scale
    for name, pred in copies.items():
        res = inputs.residuals[name]
        out[f"mae_{name}"] = metrics.mae(res, pred[0] * s)
        if len(pred) > 1:
            out[f"mae_rotated_{name}"] = float(np.mean([metrics.mae(res, p * s) for p in pred[1:]]))
        # ‖F(R·A) − F(A)‖ averaged over molecules and rotations, in units of σ_y (targets' scale).
        out[f"invariance_error_{name}"] = metrics.mean_relative_change(pred[..., None], scale=1.0)
        if reference is not None:
            out[f"distance_to_kernel_{name}"] = metrics.relative_distance(pred[0], reference[name][0])
    return out


# ---------------------------------------------------------------------------------------------- kernels

def kernel_spec(name: str, config: MoleculeCompareConfig, width_spec: AtomMLPEnsembleSpec) -> AtomKernelSpec:
    """The kernel of `name` with the networks' layer settings (the MLP twin's depth, σ_w, σ_b, …)."""
    if name == "so3gcnn":
        return AtomKernelSpec("so3gcnn", quadrature_degree=config.quadrature_degree)
    return width_spec.kernel_spec(name, quadrature_degree=config.quadrature_degree)


def kernel_part(config: MoleculeCompareConfig, inputs: Inputs, *, progress=None, log=lambda m: None) -> dict:
    """Training kernels, the common η, and μ_k of every kernel on every set's copies.

    The quadrature kernels (mlp-so3avg, so3gcnn) are invariant by construction and cost 10-25× the
    MLP kernel; they are evaluated on one rotated copy only (enough to show it), the MLP on all.
    """
    from eqkernels.pipelines.molecules_model import error_sample, ridge_floor
    from eqkernels.solvers import select_ridge_loo

    net = AtomMLPEnsembleSpec()
    tr = inputs.train
    out = {"models": {}, "seconds": {}}
    for name in KERNELS:
        t0 = time.perf_counter()
        mk = MoleculeKernel(kernel_spec(name, config, net), inputs.env_spec.l_max, progress=progress)
        k_train = mk(tr.x, tr.mol, tr.n, description=f"{name}: training kernel")["ntk"]
        lambda_max = float(np.linalg.eigvalsh(k_train)[-1])
        if name == "mlp":
            out["lambda_max"], out["eta"] = lambda_max, config.lr_scale / lambda_max
            out["plain_train_ntk"] = k_train
        # The MLP and its average share η (the augmented ensemble follows the average at the MLP's η);
        # the GCNN kernel has a scale of its own and no finite twin here: its own 1/λ_max, or GD diverges.
        eta = out["eta"] if name != "so3gcnn" else config.lr_scale / lambda_max
        alpha = dual_coefficients(k_train, inputs.y_train, ridge=0.0, time=config.steps, learning_rate=eta,
                                  discrete=True)
        floor = ridge_floor(quadrature_error(mk.spec, error_sample(tr.x, tr.mol)))  # the measured per-atom error
        ridge, _, alpha_inf = select_ridge_loo(k_train, inputs.y_train, min_ridge=floor)
        copies, krr, k_test = {}, None, None
        n_copies = len(next(iter(inputs.sets.values()))) if name == "mlp" else min(2, len(next(iter(inputs.sets.values()))))
        for set_name, atoms in inputs.sets.items():
            rows = []
            for c, a in enumerate(atoms[:n_copies]):
                k = mk(a.x, a.mol, a.n, tr.x, tr.mol, tr.n, description=f"{name}: {set_name} copy {c}")["ntk"]
                rows.append(k @ alpha)
                if c == 0 and set_name == "test":
                    krr = metrics.mae(inputs.residuals["test"], (k @ alpha_inf) * inputs.y_scale)
                    if name == "mlp":
                        k_test = k
            copies[set_name] = np.stack(rows)
        out["models"][name] = {"copies": copies, "mae_kernel_regression": krr, "ridge": ridge, "eta": eta,
                               "lambda_max": lambda_max}
        if name == "mlp":
            out["plain_test_ntk"] = k_test
        out["seconds"][name] = time.perf_counter() - t0
        log(f"kernel {name}: {out['seconds'][name]:.0f} s")
    return out


# ------------------------------------------------------------------------------------------------ plans

def pool_specs(config: MoleculeCompareConfig, eta: float) -> dict[str, AtomMLPEnsembleSpec]:
    """The two ensemble pools (all seeds' members together), on the same η and k."""
    common = dict(width=config.width, members=config.seeds * config.members, steps=config.steps,
                  learning_rate=eta, centred=config.centred)
    return {"mlp": AtomMLPEnsembleSpec(seed=1, **common),
            "mlp-aug": AtomMLPEnsembleSpec(augment=True, seed=2, **common)}


def ensemble_copies(ens: MoleculeEnsemble, inputs: Inputs) -> dict[str, np.ndarray]:
    """Every member's outputs on every set's copies: {set: (M, R+1, N)}."""
    out = {}
    for name, atoms in inputs.sets.items():
        out[name] = np.stack([ens.outputs(a.x, a.mol, a.n) for a in atoms], axis=1)
    return out


def _calibrate(config: MoleculeCompareConfig, inputs: Inputs, eta: float) -> tuple[dict, callable]:
    """Seconds per member-step of each pool and of a width-study network (3-step probes)."""
    tr = inputs.train
    per = {}
    for pool, spec in pool_specs(config, eta).items():
        chunk = min(config.member_chunk, spec.members)
        ens = train(replace(spec, members=chunk, steps=3), tr.x, tr.mol, tr.n, inputs.y_train,
                    member_chunk=chunk, progress=False)
        per[pool] = (ens.timing["step_s"] or ens.seconds / 3) / chunk
    atoms_fraction = min(config.width_n_train, tr.n) / tr.n
    # The first layer (d × width) dominates; cost grows with the width (and the atoms trained on).
    width_step = lambda w: per["mlp"] * atoms_fraction * (w / config.width)  # noqa: E731
    return per, width_step


# -------------------------------------------------------------------------------------------------- run

def _invariance_of_mean(mean_outputs: np.ndarray) -> float:
    """Invariance error of an ensemble mean on a set's copies (R+1, N), in units of σ_y."""
    return metrics.mean_relative_change(mean_outputs[..., None], scale=1.0)


class MoleculeComparison(CompareAdapter):
    """Molecules for the generic comparison (`eqkernels.pipelines.compare`): rotated copies, per-atom MLPs."""

    budget_words = ("estimated {total:.0f} s for the ensembles of a {budget:.0f} s remaining budget: sizes as configured",
                    "estimated {total:.0f} s for the ensembles after fitting{over}: ")

    def load_inputs(self, config, data, ood):
        return load_inputs(config, data, ood)

    def calibrate(self, config, inputs, kernels):
        """Seconds of the ensembles (pools and width study) from 3-step probes at the kernels' η."""
        per, width_step = _calibrate(config, inputs, kernels["eta"])

        def estimate(c):
            pools = sum(c.seeds * c.members * c.steps * per[p] for p in per)
            return pools + sum(width_step(w) * c.width_members * c.steps for w in c.widths)

        return estimate, None

    def kernel_part(self, config, inputs, *, progress, log):
        return kernel_part(config, inputs, progress=progress, log=log)

    def kernel_log(self, config, kernels, seconds):
        return f"kernels in {seconds:.0f} s; η = {kernels['eta']:.3g} (1/λ_max × {config.lr_scale:g})"

    def kernel_rows(self, config, inputs, kernels):
        zeros = {k: np.zeros((1, len(v))) for k, v in inputs.residuals.items()}
        rows = {"baseline": {"kind": "baseline", "label": "element fit only (no learned part)",
                             "values": measure(zeros, inputs)}}
        for name, info in kernels["models"].items():
            rows[f"kernel {name}"] = {"kind": "kernel", "label": f"{name} NTK (μ_k)", "values": measure(info["copies"], inputs),
                                      "mae_kernel_regression": info["mae_kernel_regression"], "eta": info["eta"],
                                      "lambda_max": info["lambda_max"],
                                      "rotated_copies": len(next(iter(info["copies"].values()))) - 1}
        return rows

    def pool_specs(self, config, inputs, eta):
        return pool_specs(config, eta)

    def train_pool(self, spec, inputs, *, member_chunk, progress, description):
        tr = inputs.train
        return train(spec, tr.x, tr.mol, tr.n, inputs.y_train, member_chunk=member_chunk, progress=progress,
                     description=description)

    def member_outputs(self, config, ensemble, inputs):
        return ensemble_copies(ensemble, inputs)                       # {set: (M, R+1, N)}

    def reference(self, config, kernels, pool):
        return kernels["models"][POOLS[pool]]["copies"]

    def measure(self, outputs, inputs, reference=None):
        return measure(outputs, inputs, reference)

    def curve_metrics(self, inputs, reference):
        out = []
        for name in inputs.sets:
            out += [(f"invariance_error_{name}", lambda o, s=name: o[s], _invariance_of_mean),
                    (f"mae_{name}", lambda o, s=name: o[s][:, 0],
                     lambda m, r=inputs.residuals[name]: metrics.mae(r, m * inputs.y_scale))]
        out.append(("distance_to_kernel_test", lambda o: o["test"][:, 0],
                    lambda m, ref=reference["test"][0]: metrics.relative_distance(m, ref)))
        return out

    def row_extras(self, config):
        return {"rotated_copies": config.rotations}

    def saved_ensemble(self, ensemble, members, inputs, pool):
        """The first seed with the features and baseline a prediction needs (`molecules_ensemble`)."""
        return EnsembleFile(ensemble.select(range(members)), *ensemble_meta(inputs))

    def pool_log(self, config, row):
        v = row["values"]
        return f"MAE test {v['mae_test'][0]:.0f} meV, invariance error test {v['invariance_error_test'][0]:.3f}"

    def width_subset(self, config, inputs, kernels):
        """The first width_n_train training molecules (atoms are sorted by molecule)."""
        tr = inputs.train
        n_sub = min(config.width_n_train, tr.n)
        keep = tr.mol < n_sub
        return WidthSubset(n_sub, Atoms(tr.x[keep], tr.mol[keep], n_sub), inputs.y_train[:n_sub],
                           kernels["plain_train_ntk"][:n_sub, :n_sub], kernels["plain_test_ntk"][:, :n_sub])

    def width_ensemble(self, config, width, eta, subset, progress):
        spec = AtomMLPEnsembleSpec(width=width, members=config.width_members, steps=config.steps,
                                   learning_rate=eta, centred=True, seed=100 + width)
        a = subset.train
        return train(spec, a.x, a.mol, a.n, subset.y, member_chunk=min(config.member_chunk, spec.members),
                     progress=progress, description=f"width {width}: training centred MLPs")

    def test_outputs(self, ensemble, inputs):
        test = inputs.sets["test"][0]
        return ensemble.outputs(test.x, test.mol, test.n)

    def summary(self, config, inputs, kernels, parts):
        p = parts
        return {"task": "molecules", "target": TARGET, "unit": UNIT, "config": config.to_dict(),
                "sets": inputs.descriptions, "y_scale": inputs.y_scale, "eta": kernels["eta"],
                "lambda_max": kernels["lambda_max"], "rows": p["rows"], "curves": p["curves"], "pools": p["pools"],
                "width_study": p["width_study"], "budget": p["budget"], "budget_note": p["budget_note"],
                "timings": p["timings"], "ensembles": p["ensembles"]}


# ---------------------------------------------------------------------------------------------- report

SET_TITLES = {"test": "test", "ood": "OOD"}


def headline_rows(summary: dict) -> list[list[str]]:
    """Header and rows of the headline table: MAE (meV), invariance error (σ_y), distance to μ_k."""
    sets = list(summary["sets"])
    header = ["model"] + [f"MAE {SET_TITLES.get(s, s)} (meV)" for s in sets] + ["MAE rotated test (meV)"] + \
             [f"invariance error {SET_TITLES.get(s, s)}" for s in sets] + ["‖mean − μ_k‖/‖μ_k‖ test"]
    rows = [header]
    for row in summary["rows"].values():
        v = row["values"]
        rows.append([row["label"]] + [_fmt(v[f"mae_{s}"], 0) for s in sets] + [_fmt(v.get("mae_rotated_test"), 0)]
                    + [_fmt(v[f"invariance_error_{s}"], 4) for s in sets] + [_fmt(v.get("distance_to_kernel_test"))])
    return rows


def summary_lines(summary: dict) -> list[str]:
    out = []
    for pool in ("mlp-aug", "mlp"):
        curve = summary["curves"].get(pool, {}).get("invariance_error_test")
        if not curve or not curve["sizes"]:
            continue
        a, b = curve["mean"][0], curve["mean"][-1]
        m0, m1 = curve["sizes"][0], curve["sizes"][-1]
        out.append(f"- **{summary['pools'][pool]['label']}**: invariance error of the ensemble mean (test) "
                   f"{a:.4f} with {m0} member(s) → {b:.4f} with {m1} (×{b / a:.2f}; 1/√members would give "
                   f"×{math.sqrt(m0 / m1):.2f})")
    rows = summary["rows"]
    out.append(f"- **kernels**: invariance error (test) of `mlp` {rows['kernel mlp']['values']['invariance_error_test']:.4f}; "
               f"`mlp-so3avg` {rows['kernel mlp-so3avg']['values']['invariance_error_test']:.1e} and `so3gcnn` "
               f"{rows['kernel so3gcnn']['values']['invariance_error_test']:.1e} (invariant up to the SO(3) quadrature "
               f"of degree {summary['config']['quadrature_degree']}"
               + (f", below the default {DEFAULT_QUADRATURE_DEGREE}: a speed option"
                  if summary["config"]["quadrature_degree"] < DEFAULT_QUADRATURE_DEGREE else "") + ")")
    return out + width_study_line(summary["width_study"])


def markdown(summary: dict) -> str:
    c, t = summary["config"], summary["timings"]
    sets = list(summary["sets"])
    lines = ["# eqk compare: emergent invariance on molecules (SO(3))", "",
             f"Run time **{t['total']:.0f} s** ({summary['budget_note']}).", "", "## Set-up", "",
             f"- **target**: {summary['target']} in meV, minus QM9's atom reference energies and a per-element linear "
             f"fit on the training molecules (the rows' *element fit only*); networks and kernels learn the rest "
             f"divided by its standard deviation σ_y = {summary['y_scale']:.0f} meV",
             f"- **training molecules**: {c['n_train']} (random, split seed {c['split_seed']})"]
    lines += [f"- **{SET_TITLES.get(k, k)}**: {v}" for k, v in summary["sets"].items()]
    lines += ["- **atom environments**: sphere signals of every atom's neighbours in real spherical harmonics "
              "(`eqkernels.environments`, defaults: l ≤ 3, 65 channels), channel-scaled and degree-0-centred on the "
              "training atoms; a molecule's output is the sum over its atoms",
              f"- **networks**: the per-atom MLP twin of the `mlp` kernel, {c['width']} hidden units, one ReLU layer, "
              f"NTK parametrisation (σ_w = √2, σ_b = 0.1, readout 1, no readout bias), all parameters N(0, 1)"
              + ("; members are **centred**, F(x;θ) − F(x;θ₀): an uncentred member's random initial function, a sum "
                 "over ~18 atoms, is larger than the targets, non-invariant, and averages out only as 1/√members; "
                 "centring removes it exactly, so what is left is what training does" if c["centred"] else
                 "; members are uncentred (their random initial functions are part of the ensemble mean)"),
              f"- **training**: {c['steps']} full-batch gradient-descent steps (optax SGD) on ½Σ(F(A) − y_A)² at "
              f"η = {summary['eta']:.4g} = {c['lr_scale']:g}/λ_max (λ_max = {summary['lambda_max']:.4g} of the `mlp` "
              f"NTK on the training molecules); **augmented** members see every training molecule under a fresh "
              f"Haar-random rotation at every step (Wigner matrices D(R) applied to the atom signals, which equals "
              f"recomputing the environments from rotated coordinates), so their mean follows `mlp-so3avg` at the same η",
              f"- **kernels**: μ_k = Θ(x,X) Θ⁻¹ (I − (I − ηΘ)^k) Y after the same k = {c['steps']} discrete steps; "
              f"`mlp` and `mlp-so3avg` at the networks' η, `so3gcnn` (no finite twin here) at its own "
              f"η = {c['lr_scale']:g}/λ_max = {summary['rows']['kernel so3gcnn']['eta']:.4g}, since its scale differs; "
              f"SO(3) quadrature degree {c['quadrature_degree']}",
              f"- **rotations**: invariance errors and rotated MAEs use {c['rotations']} random rotations of every "
              f"molecule (the quadrature kernels, invariant by construction and 10-25× dearer, 1)",
              f"- **ensembles**: {c['seeds']} independent ensembles (\"seeds\") of {c['members']} members per model; "
              "mean ± std over them. Kernel rows are deterministic given the data.", ""]
    lines += ["## Summary", ""] + summary_lines(summary) + [""]
    lines += ["## Headline", ""] + _table(headline_rows(summary))
    lines += ["", "*invariance error*: mean over molecules and rotations R of |F(R·A) − F(A)| of the (ensemble) mean, "
              "in units of σ_y; 0 = invariant. *‖mean − μ_k‖/‖μ_k‖*: distance of the ensemble mean on the test "
              "molecules to the matching kernel's mean prediction (mlp → `mlp`, augmented → `mlp-so3avg`). "
              "*MAE kernel regression (t = ∞)*, for reference: "
              + ", ".join(f"`{k.split(' ', 1)[1]}` {r['mae_kernel_regression']:.0f} meV"
                          for k, r in summary["rows"].items() if r["kind"] == "kernel") + ".", ""]
    lines += ["## Over the number of members", "",
              "Members of all seeds pooled; each size is averaged over disjoint ensembles from the pool.", ""]
    metrics_shown = [(f"invariance_error_{s}", f"invariance error, {SET_TITLES.get(s, s)}") for s in sets] + \
                    [("distance_to_kernel_test", "‖mean − μ_k‖/‖μ_k‖, test"), ("mae_test", "MAE test (meV)")]
    lines += member_curve_tables(summary, metrics_shown, digits=lambda metric: 0 if metric == "mae_test" else 4)
    lines += ["Plots: `members.png`.", ""]
    w = summary["width_study"]
    lines += ["## Width study: centred networks approach μ_k", "",
              f"Centred per-atom MLPs without augmentation, {w['members']} members per width, the first {w['n_train']} "
              f"training molecules, the same {c['steps']} steps at η = {w['eta']:.4g} (1/λ_max of their training "
              f"kernel × {c['lr_scale']:g}); distance to the `mlp` kernel's μ_k on the test molecules.", ""]
    lines += width_study_table(w) + ["", "Plot: `width.png`.", ""] + timing_lines(t)
    lines += ["", "Ensemble files (first seed of each model, with the preprocessing): "
              + ", ".join(f"`ensembles/{p}.h5`" for p in summary["curves"])
              + "; `eqkernels.pipelines.molecules_ensemble.predict_with_ensemble(path, molecules)` predicts from them.", ""]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summary["sets"])
    colours = {"mlp": "tab:red", "mlp-aug": "tab:blue"}
    styles = {"test": "-", "ood": ":"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for pool, curve in summary["curves"].items():
        label = summary["pools"][pool]["label"]
        for s in sets:
            c = curve[f"invariance_error_{s}"]
            errorbar_curve(axes[0], c, ls=styles.get(s, "--"), color=colours[pool],
                           label=f"{label}, {SET_TITLES.get(s, s)}")
        errorbar_curve(axes[1], curve["distance_to_kernel_test"], color=colours[pool], label=label)
        errorbar_curve(axes[2], curve["mae_test"], color=colours[pool], label=label)
    for name, colour in (("kernel mlp", "tab:red"), ("kernel mlp-so3avg", "tab:blue"), ("kernel so3gcnn", "tab:green")):
        axes[2].axhline(summary["rows"][name]["values"]["mae_test"], color=colour, lw=0.8, ls="--",
                        label=f"{name.split(' ')[1]} μ_k")
    sqrt_members_guide(axes[0], summary["curves"].get("mlp-aug", {}).get("invariance_error_test"))
    axes[0].set(xscale="log", yscale="log", xlabel="members", ylabel="invariance error (units of σ_y)",
                title="invariance error of the ensemble mean")
    axes[1].set(xscale="log", yscale="log", xlabel="members", ylabel="‖mean − μ_k‖/‖μ_k‖ (test)",
                title="distance to the kernel mean prediction")
    axes[2].set(xscale="log", xlabel="members", ylabel="MAE test (meV)", title="test MAE")
    save_figure(fig, axes, out_dir / "members.png")

    plot_width_study(summary["width_study"], out_dir / "width.png", xlabel="width (hidden units)",
                     ylabel="‖F − μ_k‖/‖μ_k‖ (test)",
                     title="centred per-atom MLPs approach the NTK mean prediction")


ADAPTER = MoleculeComparison(headline_rows, markdown, plot)
run = ADAPTER.run                      # run(config, *, data, ood, budget, progress, log) → the summary
write_report = ADAPTER.write_report    # write_report(summary, out_dir) → the JSON record
