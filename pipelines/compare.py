"""One comparison run for both domains: kernels, ensemble pools over seeds, member curves, a width study,
fitting the member counts to a time budget, and the report files (`eqk compare`).

A domain plugs in through a `CompareAdapter` (`histology_compare`, `molecules_compare`): how to load
its inputs, compute its kernels' mean predictions μ_k, train and evaluate its ensembles, measure one
predictor, and the words and plots of its report. Everything else is written here once, so both
domains measure and report their ensembles in the same way.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from eqkernels.ensembles import size_curve
from eqkernels.errors import InputError
from eqkernels.metrics import relative_distance
from eqkernels.pipelines.compare_report import mean_std
from eqkernels.solvers import dual_coefficients
from eqkernels.store import write_json

NO_BUDGET_NOTE = "no budget given: sizes as configured"


class CompareSizes:
    """What every comparison configuration shares (a dataclass mixin): the checks of the sizes and
    `to_dict`. The fields it reads: steps, lr_scale, n_ood, widths and those named in `check_sizes`."""

    def check_sizes(self, positive: tuple[str, ...]) -> None:
        """Refuse sizes below 1 (the `positive` fields), negative --n-ood/--steps, a bad rate or widths."""
        import math

        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_ood < 0 or self.steps < 0:
            raise InputError("--n-ood and --steps must be >= 0")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise InputError(f"--lr-scale must be a positive number, got {self.lr_scale}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise InputError(f"--widths must be positive integers, got {self.widths}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class WidthSubset:
    """The training subset of a width study, in the adapter's own input type, and the plain NTK on it."""

    n_train: int
    train: object             # what the adapter's `width_ensemble` trains on
    y: np.ndarray             # (n, …) its targets
    theta: np.ndarray         # (n, n) plain NTK on the subset
    k_test: np.ndarray        # (n_test, n) plain NTK, test inputs × subset


class CompareAdapter:
    """What a domain gives the generic comparison. Subclasses implement every method that raises here.

    Outputs of an ensemble (`member_outputs`) are an array or a dict of arrays, each with the members on
    the first axis; `measure` takes the same structure with that axis averaged away.
    """

    plan_before_kernels = False        # calibrate (and fit to the budget) before the kernels, not after
    member_fields = ("members",)       # config fields fit_to_budget shrinks together
    budget_words = ("estimated {total:.0f} s of a {budget:.0f} s budget: sizes as configured",
                    "estimated {total:.0f} s of a {budget:.0f} s budget after fitting{over}: ")

    def __init__(self, headline_rows, markdown, plot):
        """The report's functions of a run's summary: headline table rows, Markdown text, plots into a folder."""
        self.headline_rows, self.markdown, self.plot = headline_rows, markdown, plot

    def run(self, config, **options) -> dict:
        """`compare.run` with this adapter (options: data, ood, budget, progress, log)."""
        return run(self, config, **options)

    def write_report(self, summary: dict, out_dir) -> dict:
        """`compare.write_report` with this adapter."""
        return write_report(self, summary, out_dir)

    def load_inputs(self, config, data, ood):
        """The run's inputs (the domain's own type): training set, evaluation sets and their descriptions."""
        raise NotImplementedError

    def calibrate(self, config, inputs, kernels) -> tuple:
        """(estimate(config) → seconds or {stage: seconds}, calibration record or None)."""
        raise NotImplementedError

    def kernel_part(self, config, inputs, *, progress, log) -> dict:
        """{'eta', 'lambda_max', 'models': {name: …}, …}: the kernels' μ_k and the common learning rate."""
        raise NotImplementedError

    def kernel_log(self, config, kernels: dict, seconds: float) -> str:
        """The log line after the kernels."""
        raise NotImplementedError

    def kernel_rows(self, config, inputs, kernels: dict) -> dict:
        """{row name: row} of the kernels (and baselines) for the report's tables."""
        raise NotImplementedError

    def after_kernels(self, config, inputs, kernels: dict, progress) -> dict[str, float]:
        """Extra stages after the kernels (their seconds by name); none by default."""
        return {}

    def pool_specs(self, config, inputs, eta: float) -> dict:
        """{pool: ensemble spec} at learning rate η; a pool holds the members of all seeds."""
        raise NotImplementedError

    def train_pool(self, spec, inputs, *, member_chunk: int, progress, description: str):
        """The pool's ensemble, trained on the training set."""
        raise NotImplementedError

    def member_outputs(self, config, ensemble, inputs):
        """Every member's outputs on every evaluation set (and its transformed copies)."""
        raise NotImplementedError

    def reference(self, config, kernels: dict, pool: str):
        """The matching kernel's μ_k on the inputs the pool's outputs cover."""
        raise NotImplementedError

    def measure(self, outputs, inputs, reference=None) -> dict:
        """{measure: value} of one predictor from its outputs (members averaged away)."""
        raise NotImplementedError

    def curve_metrics(self, inputs, reference) -> list[tuple]:
        """[(name, select(member outputs) → (M, …) array, measure(mean) → float)] of the member curves."""
        raise NotImplementedError

    def row_extras(self, config) -> dict:
        """Fields added to every ensemble row."""
        return {}

    def saved_ensemble(self, ensemble, members: int, inputs, pool: str):
        """What `write_report` saves of the pool (first repeat): an object with `save(path)`."""
        raise NotImplementedError

    def after_pool(self, config, pool: str, ensemble, inputs, kernels: dict) -> None:
        """A hook after each pool (e.g. a rotation sweep of its members); nothing by default."""

    def pool_log(self, config, row: dict) -> str:
        """The domain's part of the log line after a pool (its headline figures)."""
        raise NotImplementedError

    def width_subset(self, config, inputs, kernels: dict) -> WidthSubset:
        """The training subset of the width study and the plain NTK on it."""
        raise NotImplementedError

    def width_ensemble(self, config, width: int, eta: float, subset: WidthSubset, progress):
        """A centred ensemble of the given width, trained on the subset at η."""
        raise NotImplementedError

    def test_outputs(self, ensemble, inputs) -> np.ndarray:
        """(M, n_test, …) every member's outputs on the (untransformed) test inputs."""
        raise NotImplementedError

    def members_note(self, config, fitted) -> str:
        """What `fit_to_budget` says it changed in the member counts."""
        return f"members per ensemble reduced from {config.members} to {fitted.members}"

    def summary(self, config, inputs, kernels: dict, parts: dict) -> dict:
        """The run's JSON-ready record from the generic `parts` (rows, curves, pools, width_study, budget,
        budget_note, calibration, timings, ensembles) and the domain's own figures."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ budget

def _seconds(estimate) -> float:
    """Total seconds of an estimate: a number or {stage: seconds}."""
    return float(sum(estimate.values())) if isinstance(estimate, dict) else float(estimate)


def fit_to_budget(adapter: CompareAdapter, config, estimate, budget: float) -> tuple:
    """Shrink the member counts (then the widest widths) until the estimate fits in 90% of `budget`;
    returns (fitted config, a note saying what was changed)."""
    fits, fitted_words = adapter.budget_words
    fields = adapter.member_fields
    fitted, total = config, _seconds(estimate(config))
    if total <= 0.9 * budget:
        return fitted, fits.format(total=total, budget=budget)
    while total > 0.9 * budget and any(getattr(fitted, k) > 2 for k in fields):
        f = max(min(0.9 * budget / total, 0.9), 0.3)
        fitted = replace(fitted, **{k: max(2, int(getattr(fitted, k) * f)) for k in fields})
        total = _seconds(estimate(fitted))
    while total > 0.9 * budget and len(fitted.widths) > 2:
        fitted = replace(fitted, widths=tuple(sorted(fitted.widths))[:-1])
        total = _seconds(estimate(fitted))
    notes = []
    if any(getattr(fitted, k) != getattr(config, k) for k in fields):
        notes.append(adapter.members_note(config, fitted))
    if fitted.widths != config.widths:
        notes.append(f"width study limited to widths {list(fitted.widths)}")
    over = " (still over: the smallest plan)" if total > 0.9 * budget else ""
    return fitted, fitted_words.format(total=total, budget=budget, over=over) + "; ".join(notes)


def _plan(adapter, config, inputs, kernels, budget, started: float, timings: dict, log) -> tuple:
    """(config, budget note, calibration): calibrated and fitted to what is left of `budget`."""
    if budget is None or budget <= 0:
        return config, NO_BUDGET_NOTE, None
    t0 = time.perf_counter()
    estimate, calibration = adapter.calibrate(config, inputs, kernels)
    config, note = fit_to_budget(adapter, config, estimate, budget - (time.perf_counter() - started))
    if calibration is not None:
        calibration["estimate"] = estimate(config)
    timings["calibration"] = time.perf_counter() - t0
    log(f"plan: {note}")
    return config, note, calibration


# ------------------------------------------------------------------------------------------------- pools

def _map_outputs(fn, outputs):
    """`fn` applied to an output array, or to every array of a dict of them."""
    return {k: fn(v) for k, v in outputs.items()} if isinstance(outputs, dict) else fn(outputs)


def run_pool(adapter, config, inputs, kernels: dict, pool: str, spec, *, progress=None, log=lambda m: None) -> dict:
    """Train one pool (all seeds' members), measure each seed's ensemble mean and the member curves.

    Returns {'row', 'curve', 'info', 'saved', 'seconds'}."""
    t0 = time.perf_counter()
    ens = adapter.train_pool(spec, inputs, member_chunk=min(config.member_chunk, spec.members), progress=progress,
                             description=f"training {spec.label} ensembles")
    outputs = adapter.member_outputs(config, ens, inputs)
    reference = adapter.reference(config, kernels, pool)
    per_seed = spec.members // config.seeds
    seeds = [adapter.measure(_map_outputs(lambda v, s=s: v[s * per_seed:(s + 1) * per_seed].mean(0), outputs),
                             inputs, reference) for s in range(config.seeds)]
    row = {"kind": "ensemble", "label": f"{spec.label} ensemble, {per_seed} members", "members": per_seed,
           "seeds": seeds, "values": mean_std(seeds), **adapter.row_extras(config)}
    saved = adapter.saved_ensemble(ens, per_seed, inputs, pool)
    curve = {name: size_curve(select(outputs), config.curve_sizes, fn)
             for name, select, fn in adapter.curve_metrics(inputs, reference)}
    adapter.after_pool(config, pool, ens, inputs, kernels)
    seconds = time.perf_counter() - t0
    info = {"spec": spec.to_dict(), "label": spec.label, "seconds": seconds, "train_seconds": ens.seconds,
            "timing": ens.timing,
            "final_loss_mean": float(np.mean(ens.loss_history[-1])) if spec.steps else None,
            "initial_loss_mean": float(np.mean(ens.loss_history[0])) if spec.steps else None}
    log(f"{spec.label}: {spec.members} members in {time.perf_counter() - t0:.0f} s; {adapter.pool_log(config, row)}")
    return {"row": row, "curve": curve, "info": info, "saved": saved, "seconds": seconds}


def run_width_study(adapter, config, inputs, kernels: dict, *, progress=None) -> dict:
    """Centred ensembles of growing width on a training subset: distance of the ensemble mean (and of
    single members) to the plain kernel's μ_k on the test inputs, at η = lr_scale / λ_max of the subset."""
    sub = adapter.width_subset(config, inputs, kernels)
    eta = config.lr_scale / float(np.linalg.eigvalsh(sub.theta)[-1])
    alpha = dual_coefficients(sub.theta, sub.y, ridge=0.0, time=config.steps, learning_rate=eta, discrete=True)
    mu = sub.k_test @ alpha
    out = {"n_train": int(sub.n_train), "eta": eta, "members": config.width_members, "widths": [],
           "distance_mean": [], "distance_member_mean": [], "distance_member_std": [], "seconds": []}
    for width in sorted(config.widths):
        t0 = time.perf_counter()
        outputs = adapter.test_outputs(adapter.width_ensemble(config, int(width), eta, sub, progress), inputs)
        member = [relative_distance(o, mu) for o in outputs]
        out["widths"].append(int(width))
        out["distance_mean"].append(relative_distance(outputs.mean(0), mu))
        out["distance_member_mean"].append(float(np.mean(member)))
        out["distance_member_std"].append(float(np.std(member)))
        out["seconds"].append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------------- run

def run(adapter: CompareAdapter, config, *, data=None, ood=None, budget: float | None = None, progress=None,
        log=lambda message: None) -> dict:
    """Everything the report shows, as a dict of JSON-ready values plus the ensembles to save."""
    started = time.perf_counter()
    timings = {}
    inputs = adapter.load_inputs(config, data, ood)
    timings["data"] = time.perf_counter() - started
    note, calibration = NO_BUDGET_NOTE, None
    if adapter.plan_before_kernels:
        config, note, calibration = _plan(adapter, config, inputs, None, budget, started, timings, log)
    t0 = time.perf_counter()
    kernels = adapter.kernel_part(config, inputs, progress=progress, log=log)
    timings["kernels"] = time.perf_counter() - t0
    log(adapter.kernel_log(config, kernels, timings["kernels"]))
    if not adapter.plan_before_kernels:
        config, note, calibration = _plan(adapter, config, inputs, kernels, budget, started, timings, log)
    rows = adapter.kernel_rows(config, inputs, kernels)
    timings.update(adapter.after_kernels(config, inputs, kernels, progress))
    curves, pools, saved = {}, {}, {}
    for pool, spec in adapter.pool_specs(config, inputs, kernels["eta"]).items():
        result = run_pool(adapter, config, inputs, kernels, pool, spec, progress=progress, log=log)
        rows[f"ensemble {pool}"], curves[pool], pools[pool] = result["row"], result["curve"], result["info"]
        saved[pool] = result["saved"]
        timings[f"ensembles {pool}"] = result["seconds"]
    t0 = time.perf_counter()
    width_study = run_width_study(adapter, config, inputs, kernels, progress=progress)
    timings["width study"] = time.perf_counter() - t0
    log("width study: " + ", ".join(f"{w}: {d:.3f}" for w, d in zip(width_study["widths"],
                                                                     width_study["distance_mean"])))
    timings["total"] = time.perf_counter() - started
    parts = {"rows": rows, "curves": curves, "pools": pools, "width_study": width_study, "budget": budget,
             "budget_note": note, "calibration": calibration, "timings": timings, "ensembles": saved}
    return adapter.summary(config, inputs, kernels, parts)


def write_report(adapter: CompareAdapter, summary: dict, out_dir: str | Path) -> dict:
    """report.md, report.json, the plots and ensembles/*.h5 in `out_dir`; returns the JSON record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pool, ens in summary.pop("ensembles", {}).items():
        ens.save(out_dir / "ensembles" / f"{pool}.h5")
    summary["headline"] = adapter.headline_rows(summary)
    write_json(out_dir / "report.json", summary)
    adapter.plot(summary, out_dir)
    (out_dir / "report.md").write_text(adapter.markdown(summary))
    return summary
