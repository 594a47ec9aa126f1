"""`eqk compare`: finite deep ensembles (with and without augmentation, GCNNs) and the equivariant
kernels side by side — does the augmented ensemble become invariant, on your own data?"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from eqkernels.apps._common import atomic_dir, console
from eqkernels.errors import InputError

TASKS = ("histology", "molecules")


def _int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"{option} takes comma-separated whole numbers, got {value!r}") from None
    if not items or min(items) < 1:
        raise InputError(f"{option} takes comma-separated whole numbers >= 1, got {value!r}")
    return items


# Options that only the histology comparison has; refused with --task molecules when given.
HISTOLOGY_ONLY = ("size", "group", "gcnn_width", "gcnn_members", "batch_size", "sweep")
# Options that only the molecule comparison has; refused with --task histology when given.
MOLECULES_ONLY = ("rotations", "quadrature_degree")


def _given_options() -> tuple[set, dict]:
    """(names of the options given on the command line, every option's value) of the running command."""
    try:  # typer ≥ 0.20 vendors click; a separate click (a dependency of dask distributed) has no context
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    ctx = get_current_context()
    # By name: the ParameterSource enum lives in whichever click is in use.
    given = {name for name in ctx.params
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    return given, dict(ctx.params)


def compare(
    task: str = typer.Option("histology", help="What to compare on: histology (tiles, C4/D4) or molecules (QM9 "
                                               "U0, SO(3); its own defaults for the options not given)."),
    data: Optional[Path] = typer.Option(None, help="Labelled tiles: folder of class folders, MedMNIST .npz or hmnist "
                                                   ".csv [default: bundled PathMNIST sample]; molecules: any file "
                                                   "`eqk molecules` reads [default: bundled QM9 sample]."),
    ood: Optional[Path] = typer.Option(None, help="Out-of-distribution tiles [default: bundled Kather-2016 8×8 tiles]; "
                                                  "Gaussian noise images are always added. Molecules: OOD molecules "
                                                  "[default: the --n-ood largest molecules of --data, held out]."),
    out: Path = typer.Option(Path("eqk-compare"), "--out", "-o", help="Report folder (Markdown, JSON, PNG, ensemble "
                                                                      "files)."),
    budget: float = typer.Option(900.0, help="Seconds for the run: the member counts (then the widest widths) are "
                                             "reduced if the calibrated estimate exceeds it; 0 = run as configured."),
    size: int = typer.Option(8, help="Tiles are resized to size×size px."),
    n_train: int = typer.Option(100, "--n-train", help="Training tiles (class-stratified)."),
    n_test: int = typer.Option(200, "--n-test", help="Held-out tiles."),
    n_ood: int = typer.Option(100, "--n-ood", help="OOD tiles, and as many noise images (0: none)."),
    group: str = typer.Option("C4", help="Symmetry group: C4 (rotations) or D4 (with reflections), exact on the "
                                         "grid; C8, C16, D8, D16 by interpolation on disk-masked tiles (no GCNN)."),
    width: int = typer.Option(16, help="CNN channels."),
    gcnn_width: int = typer.Option(8, "--gcnn-width", help="GCNN channels per group element."),
    steps: int = typer.Option(150, help="Gradient-descent steps."),
    lr_scale: float = typer.Option(1.0, "--lr-scale", help="Learning rate as a multiple of 1/λ_max of the training NTK."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="SGD minibatch size [default: full batch]."),
    members: int = typer.Option(20, help="Members of one CNN ensemble."),
    gcnn_members: int = typer.Option(10, "--gcnn-members", help="Members of one GCNN ensemble."),
    seeds: int = typer.Option(5, help="Independent ensembles per model (mean ± std over them)."),
    curve_sizes: str = typer.Option("1,2,5,10,20,50,100", "--curve-sizes", help="Ensemble sizes for the curves "
                                                                                "(members of all seeds pooled)."),
    centred: bool = typer.Option(False, "--centred/--uncentred", help="Train the compared ensembles as centred "
                                                                      "networks f(x;θ) − f(x;θ₀) (the width study "
                                                                      "always is) [molecules default: centred]."),
    rotations: int = typer.Option(3, help="Molecules: random rotations per molecule for the invariance error."),
    quadrature_degree: int = typer.Option(17, "--quadrature-degree", help="Molecules: SO(3) quadrature degree of the "
                                                                          "mlp-so3avg and so3gcnn kernels (lower: a "
                                                                          "speed option, flagged in the report)."),
    widths: str = typer.Option("16,32,64,128", help="Widths of the centred width study."),
    width_members: int = typer.Option(4, "--width-members", help="Members per width in the width study."),
    width_n_train: int = typer.Option(40, "--width-n-train", help="Training tiles of the width study."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the train/test split and of the OOD picks."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Histology: accuracy and agreement at every 15° "
                                                                "(disk-masked test tiles) for kernels and ensembles."),
):
    """Train deep ensembles (CNN, CNN with full group augmentation, GCNN) and the NTK models on the same
    tiles and compare accuracy, orbit-same-predictions on test and out-of-distribution inputs, invariance
    error and the distance to the kernel mean prediction; writes report.md, report.json and plots."""
    if task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    given, params = _given_options()
    wrong = sorted(given & set(HISTOLOGY_ONLY if task == "molecules" else MOLECULES_ONLY))
    if wrong:
        raise InputError(f"--{wrong[0].replace('_', '-')} does not apply to --task {task}")
    if task == "molecules":
        return _compare_molecules(params, given, out, budget)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    from eqkernels.pipelines import histology_compare as hc

    config = hc.CompareConfig(size=size, n_train=n_train, n_test=n_test, n_ood=n_ood, group=group.upper(),
                              width=width, gcnn_width=gcnn_width, steps=steps, lr_scale=lr_scale,
                              batch_size=batch_size, members=members, gcnn_members=gcnn_members, seeds=seeds,
                              centred=centred,
                              curve_sizes=_int_list(curve_sizes, "--curve-sizes"),
                              widths=_int_list(widths, "--widths"), width_members=width_members,
                              width_n_train=width_n_train, split_seed=split_seed, sweep=sweep)
    if batch_size is not None and batch_size > min(config.n_train, config.width_n_train):
        raise InputError(f"--batch-size {batch_size} exceeds the training tiles (--n-train {config.n_train}, "
                         f"--width-n-train {config.width_n_train})")
    _run_and_print(hc, config, data, ood, out, budget,
                   lambda s: f"Emergent equivariance, {s['group']} (mean ± std over {config.seeds} ensembles)")


def _compare_molecules(params: dict, given: set, out: Path, budget: float):
    """`eqk compare --task molecules`: the options given on the command line over the molecule defaults."""
    from eqkernels.pipelines import molecules_compare as mc

    fields = set(mc.MoleculeCompareConfig.__dataclass_fields__) - {"member_chunk"}
    options = {}
    for name in sorted(given & fields):
        value = params[name]
        options[name] = _int_list(value, f"--{name.replace('_', '-')}") if name in ("widths", "curve_sizes") else value
    config = mc.MoleculeCompareConfig(**options)
    _run_and_print(mc, config, params["data"], params["ood"], out, budget,
                   lambda s: f"Emergent invariance on molecules, SO(3) "
                             f"(mean ± std over {s['config']['seeds']} ensembles)")


def _run_and_print(pipeline, config, data, ood, out: Path, budget: float, title) -> None:
    """Run a comparison pipeline (`run`, `write_report`) into `out` atomically and print its headline table."""
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        summary = pipeline.run(config, data=data, ood=ood, budget=budget if budget > 0 else None, progress=None,
                               log=lambda m: console.print(f"[dim]{time.perf_counter() - started:6.0f} s[/]  {m}"))
        pipeline.write_report(summary, tmp)
    rows = summary["headline"]
    table = Table(title=title(summary))
    for i, col in enumerate(rows[0]):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    console.print(f"finished in {time.perf_counter() - started:.0f} s → {out}/report.md")
