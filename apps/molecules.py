"""`eqk molecules`: train, predict and report QM9 property models with invariant NTKs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from eqkernels.apps._common import atomic_dir, cluster_option, console, kernel_executor, scheduler_option, to_jsonable
from eqkernels.errors import InputError

app = typer.Typer(no_args_is_help=True, help="Molecules (QM9 and any ASE file): train, predict, report.",
                  add_completion=False, pretty_exceptions_enable=False)


def _pipeline():
    # Imported lazily so `eqk --help` stays fast (jax and e3nn take seconds to import).
    from eqkernels.pipelines import molecules

    return molecules


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Model file to write (HDF5)."),
    data: Optional[str] = typer.Option(None, "--data", help="QM9 data: qm9pack CSV(.xz)/npz, ASE db, QM9 xyz folder "
                                       "or archive, or 'qm9pack'. Default: the bundled 2,000-molecule sample."),
    target: str = typer.Option("U0", "--target", help="Property: U0 U H G homo lumo gap zpve mu alpha r2 Cv A B C; "
                               "a vector: mulliken_dipole (Σ q_i r_i of QM9's Mulliken charges, e*Å or D); or a "
                               "symmetric tensor: polarizability (or any vector/tensor property of the data by name)."),
    target_file: Optional[str] = typer.Option(None, "--target-file", help="CSV with a vector (TARGET_x, _y, _z) or "
                                              "symmetric tensor (TARGET_xx … _zz) per QM9 molecule (XYZ_file or "
                                              "Index column), in the coordinates' frame, matched by QM9 index."),
    kernel: str = typer.Option("so3gcnn", "--kernel", help="mlp | mlp-so3avg | so3gcnn."),
    n_train: int = typer.Option(200, "--n-train", help="Training molecules (a fixed random split)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Output unit for energies: eV (default), meV, Ha, kcal/mol."),
    l_max: int = typer.Option(3, "--l-max", help="Spherical-harmonic degree of the atom environments."),
    cutoff: float = typer.Option(4.0, "--cutoff", help="Neighbour cutoff radius (Å)."),
    quadrature: Optional[int] = typer.Option(None, "--quadrature", help="SO(3) quadrature degree (mlp-so3avg, "
                                             "so3gcnn); default 17 (invariance error of predictions < 1e-3). Lower "
                                             "degrees are a speed option, flagged in the output."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Hidden layers (mlp) / group convolutions (so3gcnn)."),
    ridge: Optional[float] = typer.Option(None, "--ridge", help="Relative ridge; default: chosen by leave-one-out."),
    max_atoms: Optional[int] = typer.Option(None, "--max-atoms", help="Largest molecule the model accepts "
                                            "(default: twice the largest training molecule)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder for resumable training-kernel blocks."),
    cluster: Optional[str] = cluster_option(),
    scheduler: Optional[str] = scheduler_option(),
    inducing: str = typer.Option("auto", "--inducing", help="Solver: 'exact' KRR, M inducing molecules (Nyström-"
                                 "preconditioned CG), or 'auto': exact while the N×N kernel fits the memory budget, "
                                 "else M = min(N, 2000)."),
    reduction: Optional[str] = typer.Option(None, "--reduction", help="sum | mean: the per-atom kernel summed over "
                                            "atom pairs (extensive) or averaged (intensive). Default: mean for homo, "
                                            "lumo, gap, mu; sum otherwise."),
    tune: bool = typer.Option(False, "--tune", help="Choose H out of the sum (summed targets), depth, bias, cutoff, "
                              "radial channels, angular width, l_max, NTK/NNGP and ridge by 5-fold CV on the "
                              "training set within --budget."),
    budget: float = typer.Option(600.0, "--budget", help="Seconds for --tune (search and final fit)."),
    sum_atoms: str = typer.Option("all", "--sum-atoms", help="all | heavy: the atoms whose environments the "
                                  "summed kernel adds up; 'heavy' leaves H out (H stay neighbours): on QM9 U0 "
                                  "more accurate and about 4x cheaper (benchmarks/README.md). Summed targets only."),
):
    """Fit a model on N training molecules and save it."""
    from eqkernels.nystrom import check_inducing, describe_solver, parse_inducing

    inducing_choice = check_inducing(parse_inducing(inducing), n_train)  # before any data is read
    mp = _pipeline()
    from eqkernels.environments import EnvironmentSpec
    from eqkernels.pipelines.molecules_model import default_reduction, fit_model
    from eqkernels.so3 import DEFAULT_QUADRATURE_DEGREE, AtomKernelSpec

    if sum_atoms not in ("all", "heavy"):
        raise InputError(f"--sum-atoms must be all or heavy, got {sum_atoms!r}")
    try:
        env = EnvironmentSpec(l_max=l_max, cutoff=cutoff)
        env = env.with_amplitude(1, 0.0) if sum_atoms == "heavy" else env
        options = {k: v for k, v in (("quadrature_degree", quadrature), ("depth", depth)) if v is not None}
        spec = AtomKernelSpec(kernel, **options)
    except ValueError as e:
        raise InputError(str(e)) from None
    path = data or str(mp.default_data_path())
    from eqkernels.pipelines.molecules_tensor import is_tensor_target

    if is_tensor_target(target):
        if tune or reduction:
            raise InputError(f"--tune and --reduction are for scalar targets, not the vector/tensor {target!r}")
        from eqkernels.apps.molecules_tensor import train_tensor

        if inducing_choice != "auto":
            raise InputError("--inducing applies to scalar targets; vector/tensor models are fitted exactly")

        return train_tensor(out, path, target, kernel, n_train, seed, unit, env, spec, ridge, max_atoms, target_file)
    if target_file:
        raise InputError(f"--target-file is for vector and tensor targets; {target!r} is a scalar QM9 property")
    mols = mp.load_molecules(path)
    train_idx, _ = mp.split_indices(len(mols), n_train, None, seed)
    reduction = reduction or default_reduction(target)
    if reduction not in ("sum", "mean"):
        raise InputError(f"--reduction must be sum or mean, got {reduction!r}")
    if sum_atoms == "heavy" and reduction != "sum":
        # K / (n n') would still count the H atoms in n: the amplitudes were measured for sums only
        raise InputError(f"--sum-atoms heavy is for summed (extensive) targets; {target!r} uses the {reduction} "
                         "over atom pairs")
    choice, meta = {}, {"split_seed": seed, "data": str(path)}
    if tune:
        from eqkernels.pipelines.molecules_tune import tune as run_tune, tuned_meta

        found = run_tune(mols.subset(train_idx), target, kernel, budget_seconds=budget, unit=unit, env=env, spec=spec,
                         reduction=reduction)
        env, spec, ridge = found["env"], found["kernel_spec"], ridge or found["ridge"]
        choice, meta = {"kernel_output": found["kernel_output"]}, {**meta, **tuned_meta(found)}
    with kernel_executor(cluster, scheduler) as executor:
        model = fit_model(mols.subset(train_idx), target, kernel, unit=unit, env_spec=env, kernel_spec=spec,
                          ridge=ridge, max_atoms=max_atoms, progress=None, meta=meta, checkpoint=checkpoint,
                          executor=executor, inducing=inducing_choice, reduction=reduction, **choice)
    model.save(out)
    console.print(f"{out}: {kernel} model of {target} ({model.unit}) on {model.meta.get('n_train', model.n_train)} molecules, "
                  f"ridge {model.ridge:g}, {_quadrature_summary(model)}, "
                  f"kernel {model.meta['kernel_seconds']:.1f} s, {model.reduction} over atom pairs")
    if tune:
        console.print(f"--tune: {model.meta['kernel_output']}, CV MAE {model.meta['tune']['cv_mae']:.4g} "
                      f"{model.unit} ({len(model.meta['tune']['trials'])} settings, {model.meta['tune']['seconds']:.0f} s)")
    console.print(f"solver: {describe_solver(model.meta.get('solver'))}", markup=False)
    if model.meta.get("quadrature_below_default"):
        console.print(f"speed option: quadrature degree {spec.quadrature_degree} is below the default "
                      f"{DEFAULT_QUADRATURE_DEGREE}; predictions move by up to "
                      f"{model.meta['invariance_error_rel_train']:.1e} of their size under rotation")


def _quadrature_summary(model) -> str:
    """The model's measured SO(3) quadrature figures, in one phrase (or that it has none: `mlp`)."""
    meta = model.meta
    if model.kernel_spec.name == "mlp":
        return "no quadrature (not invariant)"
    if "quadrature_error_self_pair" not in meta:  # models saved before the corrected measure
        return f"per-atom quadrature error {meta.get('quadrature_error', 0):.1e} (old measure: pairs of different atoms)"
    flag = " (a speed option, below the default)" if meta.get("quadrature_below_default") else ""  # no [..]: rich markup
    return (f"quadrature degree {model.kernel_spec.quadrature_degree}{flag}: per-atom NTK error "
            f"{meta['quadrature_error']:.1e} (self pairs {meta['quadrature_error_self_pair']:.1e}, rotated copies "
            f"{meta['quadrature_error_rotation']:.1e}), invariance error of predictions "
            f"{meta['invariance_error_rel_train']:.1e} on rotated training molecules")


@app.command()
def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `eqk molecules train`."),
    files: List[Path] = typer.Argument(..., metavar="FILE...", help="Molecule files (xyz, extxyz, sdf, pdb, QM9 xyz, "
                                       "ASE db, qm9pack CSV …)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Energy unit of the output (default: the model's)."),
    cluster: Optional[str] = cluster_option(),
    scheduler: Optional[str] = scheduler_option(),
):
    """Predict the model's property for every molecule in the files: one line 'name value unit' each.

    MODEL is a kernel model from `eqk molecules train` or an ensemble file from `eqk compare --task
    molecules` (its members' mean).
    """
    mp = _pipeline()
    from eqkernels import store
    from eqkernels.molecule_ensembles import MOLECULE_ENSEMBLE_KIND
    from eqkernels.pipelines.molecules_model import load_model
    from eqkernels.pipelines.molecules_tensor import TENSOR_MODEL_KIND

    if store.kind_of(model_path) == TENSOR_MODEL_KIND:
        from eqkernels.apps.molecules_tensor import predict_tensor

        return predict_tensor(model_path, files, as_json, unit)
    if store.kind_of(model_path) == MOLECULE_ENSEMBLE_KIND:
        from eqkernels.pipelines.molecules_ensemble import ensemble_file_info, predict_with_ensemble

        target, model_unit, elements, max_atoms = ensemble_file_info(model_path)
        predict_fn = lambda mols, executor: predict_with_ensemble(model_path, mols)  # noqa: E731
        convertible = True
    else:
        model = load_model(model_path)
        target, model_unit, elements, max_atoms = model.target, model.unit, model.env_spec.elements, model.max_atoms
        predict_fn = lambda mols, executor: model.predict(mols, check=False, executor=executor)  # noqa: E731
        convertible = model.meta.get("native_unit", "Ha") == "Ha"
    out_unit = unit or model_unit
    if out_unit != model_unit:
        if not convertible:
            raise InputError(f"{target} is in {model_unit}; it cannot be given in {out_unit}")
        mp.convert_units(0.0, model_unit, out_unit)
    # Read and check every file before computing anything, so a bad file leaves no partial output.
    loaded = []
    for f in files:
        mols = mp.load_molecules(f)
        mp.check_molecules(mols, elements, max_atoms=max_atoms, path=f)
        loaded.append((f, mols))
    rows = []
    with kernel_executor(cluster, scheduler) as executor:  # kernel models only; ensembles ignore it
        values_by_file = [mp.convert_units(predict_fn(mols, executor), model_unit, out_unit) for _, mols in loaded]
    for (f, mols), values in zip(loaded, values_by_file):
        for name, v in zip(mols.names, values):
            label = str(f) if len(mols) == 1 else f"{f}:{name}"
            rows.append({"name": label, "value": float(v), "unit": out_unit, "target": target})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            typer.echo(f"{r['name']}\t{r['value']:.6f}\t{r['unit']}")


@app.command()
def report(
    model_path: Path = typer.Argument(..., metavar="MODEL"),
    out: Path = typer.Option(..., "--out", help="Folder for report.json, learning_curve.png and predictions.csv."),
    data: Optional[str] = typer.Option(None, "--data", help="Data with the target (default: the model's training data)."),
    n_test: int = typer.Option(300, "--n-test", help="Held-out molecules to evaluate (not in the training set)."),
    seed: int = typer.Option(1, "--seed", help="Seed for choosing test molecules and random rotations."),
    target_file: Optional[str] = typer.Option(None, "--target-file", help="Vector/tensor models: the CSV with the "
                                              "target (default: the one the model was trained with, if any)."),
):
    """Held-out MAE/RMSE, MAE on randomly rotated copies, invariance error and a learning curve
    (vector models: MAE per component and of the norm; tensor models: per component, of the isotropic part and
    anisotropy; both: the equivariance error)."""
    mp = _pipeline()
    from eqkernels import store
    from eqkernels.pipelines.molecules_model import load_model
    from eqkernels.pipelines.molecules_report import evaluate, learning_curve, plot_learning_curve
    from eqkernels.pipelines.molecules_tensor import TENSOR_MODEL_KIND

    if store.kind_of(model_path) == TENSOR_MODEL_KIND:
        from eqkernels.apps.molecules_tensor import report_tensor

        return report_tensor(model_path, out, data, n_test, seed, target_file)
    if target_file:
        raise InputError("--target-file is for vector and tensor models; this one predicts a scalar QM9 property",
                         model_path)
    model = load_model(model_path)
    path = data or model.meta.get("data") or str(mp.default_data_path())
    mols = mp.load_molecules(path)
    trained = set(model.meta.get("train_names", []))
    held = np.array([i for i, n in enumerate(mols.names) if n not in trained])
    if len(held) == 0:
        raise InputError("every molecule in the data was used for training; nothing to evaluate", path)
    rng = np.random.default_rng(seed)
    test = mols.subset(np.sort(rng.permutation(held)[:n_test]))
    result = evaluate(model, test, seed=seed, progress=None)
    curve = learning_curve(model, test, result["k_test"])
    summary = {"model": str(model_path), "target": model.target, "unit": model.unit,
               "kernel": model.kernel_spec.name, "n_train": model.meta.get("n_train", model.n_train), "data": str(path),
               "solver": model.meta.get("solver"),
               **{k: v for k, v in result.items() if k not in ("predictions", "predictions_transformed", "targets", "k_test")},
               "learning_curve": curve, "ridge": model.ridge, "quadrature_degree": model.kernel_spec.quadrature_degree,
               **{k: v for k, v in model.meta.items() if k.startswith("quadrature_")},
               "invariance_error_rel_train": model.meta.get("invariance_error_rel_train")}
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
        lines = ["name,target,predicted,predicted_transformed"]
        for name, y, p, q in zip(test.names, result["targets"], result["predictions"], result["predictions_transformed"]):
            lines.append(f"{name},{y:.6f},{p:.6f},{q:.6f}")
        (tmp / "predictions.csv").write_text("\n".join(lines) + "\n")
        plot_learning_curve(curve, tmp / "learning_curve.png", title=f"{model.kernel_spec.name}: {model.target}",
                            unit=model.unit)
    console.print(f"{model.kernel_spec.name} {model.target}: MAE {result['mae']:.4g} {model.unit}, "
                  f"RMSE {result['rmse']:.4g}, MAE on rotated copies {result['mae_transformed']:.4g}, invariance error "
                  f"{result['invariance_error_abs']:.3g} {model.unit} max ({result['invariance_error_rel']:.2e} of the "
                  f"learned part) on {len(test)} molecules; {_quadrature_summary(model)} → {out}")
