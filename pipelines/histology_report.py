"""Evaluation of histology kernel models: accuracy, recall, confusion, rotation robustness; reports.

Rotation robustness is measured out of distribution: every test tile is rotated by 0°, 90°, 180°
and 270° and classified again. The rotated copies' kernels come from the relative kernels of the
unrotated tiles through the exact identity K(a·x, g·x') = K(x, a⁻¹g·x') of the CNN kernel, so
one pass over the group suffices; a few tiles are also recomputed directly from rotated pixels and
the largest deviation is reported, so the identity is checked on every report.

Rotations at every angle (`rotation_sweep`): a subset of the test tiles, out-of-distribution tiles
(Kather-2016) and noise images are disk-masked and rotated by P_θ (`eqkernels.groups.rotate`, the
interpolation the kernels and ensembles use) every 15°, and classified again. Reported: accuracy
and agreement with the prediction of the unrotated disk-masked tile (P_0 x) at each angle, and the
orbit-same of |G| for G = C4, C8, C16 (layout of Gerken & Kessel 2024, Table 1). Each angle θ =
r + 90°·k costs one relative-kernel pass per residual r; the quarter turns come from the identity.
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels import metrics
from eqkernels.groups import get_group, rotate, rotation_group
from eqkernels.kernels.relative import relative_kernels
from eqkernels.pipelines.compare_report import markdown_table
from eqkernels.pipelines.histology_rotations import sweep_angles, sweep_measures
from eqkernels.pipelines.histology import TileSet
from eqkernels.pipelines.histology_model import HistologyModel

ROTATIONS = [(0, k) for k in range(4)]


@dataclass
class Evaluation:
    """Results of one model on one test set (arrays kept for plots; `summary` is JSON-ready)."""

    kernel: str
    class_names: list[str]
    labels: np.ndarray
    orbit_scores: np.ndarray       # (4, M, C): scores of the tiles rotated by k·90°
    orbit_classes: np.ndarray      # (4, M)
    variance: np.ndarray           # (M,) NNGP posterior variance of the unrotated tiles
    identity_check: float          # max relative deviation, identity vs direct recomputation
    seconds: dict = field(default_factory=dict)
    sweep: dict | None = None      # rotation_sweep() result (JSON-ready), or None

    @property
    def summary(self) -> dict:
        n_classes = len(self.class_names)
        known = self.labels >= 0
        cm = metrics.confusion_matrix(self.labels[known], self.orbit_classes[0][known], n_classes)
        orbit = metrics.orbit_same_predictions(self.orbit_classes)
        return {
            "kernel": self.kernel,
            "n_test": int(len(self.labels)),
            "accuracy": metrics.accuracy(self.labels[known], self.orbit_classes[0][known]),
            "accuracy_rotated": [metrics.accuracy(self.labels[known], c[known]) for c in self.orbit_classes],
            "accuracy_rotated_mean": float(np.mean([metrics.accuracy(self.labels[known], c[known])
                                                    for c in self.orbit_classes[1:]])),
            "orbit_same_predictions": float(np.mean(orbit)),
            "orbit_same_predictions_hist": np.bincount(orbit, minlength=5)[1:].tolist(),
            "max_relative_output_change": metrics.max_relative_change(self.orbit_scores),
            "per_class_recall": dict(zip(self.class_names, metrics.per_class_recall(cm).tolist())),
            "confusion_matrix": cm.tolist(),
            "mean_posterior_variance": float(np.mean(self.variance)),
            "identity_check_max_rel_dev": self.identity_check,
            "seconds": self.seconds,
            "rotation_sweep": self.sweep,
        }


def exclude_training_tiles(model: HistologyModel, tiles: TileSet) -> TileSet:
    """Drop tiles whose pixels equal a training tile's (so a report never scores training data)."""
    train = set(model.train_fingerprints.tolist())
    keep = [i for i, f in enumerate(tiles.fingerprints().tolist()) if f not in train]
    return tiles.subset(keep)


def evaluate(models: list[HistologyModel], test: TileSet, *, progress: bool | None = True,
             check_tiles: int = 2, checkpoint: str | Path | None = None) -> list[Evaluation]:
    """Evaluate models that share training tiles, preprocessing and CNN, with one relative-kernel pass.

    The pass covers the smallest group containing the rotations and every model's group (C4 or D4).
    """
    first = models[0]
    for m in models[1:]:
        if (m.spec.net != first.spec.net or m.preprocessing.size != first.preprocessing.size
                or not np.array_equal(m.train_fingerprints, first.train_fingerprints)):
            raise ValueError("models evaluated together must share training tiles, preprocessing and network")
    union = "D4" if any((m.spec.group or "").startswith("D") for m in models) else "C4"
    group = get_group(union)
    start = _time.perf_counter()
    inputs = first.preprocessing(test.images)
    shared = [m for m in models if not m.spec.interpolated]
    rel = None if not shared else relative_kernels(
        first.spec.net, inputs, first.train_inputs, group, need_self=True,
        need_self2=any(m.spec.net.readout != "linear" for m in shared), progress=progress,
        checkpoint=checkpoint, description=f"test × train kernel ({union})")
    kernel_seconds = _time.perf_counter() - start
    out = []
    for model in models:
        t0 = _time.perf_counter()
        # Interpolated families need their own pass over stacked rotated inputs (over C4 or D4).
        own = model.relative(inputs, progress=progress) if model.spec.interpolated else rel
        elements = get_group(own.group).elements
        preds = [model.predict_from_relative(own, elements.index(r)) for r in ROTATIONS]
        check = _direct_check(model, test, preds, check_tiles)
        out.append(Evaluation(model.spec.name, model.class_names, np.asarray(test.labels),
                              np.stack([p.scores for p in preds]), np.stack([p.classes for p in preds]),
                              preds[0].variance, check,
                              {"test_kernel_shared": kernel_seconds, "predict": _time.perf_counter() - t0}))
    return out


def _direct_check(model: HistologyModel, test: TileSet, preds, n: int) -> float:
    """Recompute a few rotated tiles from their pixels; max relative deviation of the scores."""
    if n <= 0 or len(test) == 0:
        return float("nan")
    idx = np.arange(min(n, len(test)))
    worst = 0.0
    for k in (1, 3):
        rotated = np.rot90(test.images[idx], k=k, axes=(1, 2))
        direct = model.predict(rotated, progress=False).scores
        via_identity = preds[k].scores[idx]
        scale = max(np.max(np.abs(direct)), 1e-30)
        worst = max(worst, float(np.max(np.abs(direct - via_identity)) / scale))
    return worst


# ------------------------------------------------------------------------------------ every angle

ORBIT_GROUPS = ("C4", "C8", "C16")


def angle_scores(model: HistologyModel, inputs: np.ndarray, angles: list[float], *,
                 progress: bool | None = None) -> np.ndarray:
    """Scores (len(angles), n, C) of P_θ x for preprocessed inputs x (n, S, S, 3); angle 0 is P_0 x.

    The inputs rotated by every residual θ mod 90° go through one relative-kernel pass over C4
    (D4 for D families); the quarter turns come from the identity.
    """
    exact = "D4" if (model.spec.group or "").upper().startswith("D") else "C4"
    out = np.empty((len(angles), len(inputs), len(model.class_names)))
    residuals = sorted({round(a % 90.0, 9) for a in angles})
    x = np.asarray(inputs, np.float32)
    rel_all = model.relative(np.concatenate([rotate(x, r) for r in residuals]), exact, progress=progress,
                             description=f"tiles at {len(residuals)} residual angles × train kernel")
    elements = get_group(rel_all.group).elements
    for j, r in enumerate(residuals):
        rel = rel_all.take_rows(np.arange(j * len(x), (j + 1) * len(x)))
        for i, a in enumerate(angles):
            if round(a % 90.0, 9) == r:
                k = int(round((a - r) / 90.0)) % 4
                out[i] = model.predict_from_relative(rel, elements.index((0, k))).scores
    return out


def rotation_sweep(model: HistologyModel, sets: dict[str, np.ndarray], labels: np.ndarray, *, step: float = 15.0,
                   progress: bool | None = None) -> dict:
    """Accuracy and agreement at every `step` degrees on sets["test"]; orbit-same (of |G|) and invariance
    error for G in ORBIT_GROUPS on every set (name → preprocessed inputs). JSON-ready."""
    sweep = sweep_angles(step)
    orbit_angles = {g: [360.0 * j / int(g[1:]) for j in range(int(g[1:]))] for g in ORBIT_GROUPS}
    angles = sorted(set(sweep) | {a for v in orbit_angles.values() for a in v})
    t0 = _time.perf_counter()
    names = list(sets)
    stacked = np.concatenate([sets[n] for n in names])
    scores = angle_scores(model, stacked, angles, progress=progress)
    classes = np.argmax(scores, axis=-1)
    bounds = np.cumsum([0] + [len(sets[n]) for n in names])
    out = {"step": step, "angles": sweep, "sets": {}, "seconds": 0.0}
    scale = float(np.sqrt(1.0 - 1.0 / len(model.class_names)))  # norm of a centred one-hot target
    for n, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        entry = {"n": int(hi - lo), "orbit_same": {}, "invariance_error": {}}
        for g, group_angles in orbit_angles.items():
            idx = [angles.index(a) for a in group_angles]
            entry["orbit_same"][g] = float(np.mean(metrics.orbit_same_predictions(classes[idx, lo:hi])))
            entry["invariance_error"][g] = metrics.mean_relative_change(scores[idx, lo:hi], scale=scale)
        if n == "test":
            entry.update(sweep_measures(scores[[angles.index(a) for a in sweep], lo:hi], labels))
        out["sets"][n] = entry
    out["seconds"] = _time.perf_counter() - t0
    out["kernel_invariance_error"] = model.options.get("invariance_error")
    return out


def sweep_sets(model: HistologyModel, test: TileSet, *, n_tiles: int, ood: TileSet | None, n_ood: int,
               seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Preprocessed evaluation sets of the sweep: test subset, OOD tiles, noise; and the test labels."""
    from eqkernels.pipelines.histology import stratified_split

    pick = test if len(test) <= n_tiles else test.subset(stratified_split(test.labels, n_tiles, seed=seed)[0])
    sets = {"test": model.preprocessing(pick.images)}
    if ood is not None and n_ood > 0:
        chosen = ood if len(ood) <= n_ood else ood.subset(np.random.default_rng(seed).choice(len(ood), n_ood,
                                                                                             replace=False))
        sets["ood"] = model.preprocessing(chosen.images)
    if n_ood > 0:
        size = model.preprocessing.size
        sets["noise"] = np.random.default_rng(seed + 12345).standard_normal((n_ood, size, size, 3)).astype(np.float32)
    return sets, np.asarray(pick.labels)


# --------------------------------------------------------------------------------------------- writing

def write_report(evaluations: list[Evaluation], out_dir: Path, *, title: str, context: dict) -> dict:
    """Write report.json, report.md and PNG plots into `out_dir`; returns the JSON content."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eqkernels.store import write_json

    out_dir = Path(out_dir)
    summaries = [e.summary for e in evaluations]
    report = {"title": title, "context": context, "models": summaries}
    write_json(out_dir / "report.json", report)

    for e, s in zip(evaluations, summaries):
        cm = np.asarray(s["confusion_matrix"])
        fig, ax = plt.subplots(figsize=(5.5, 4.8))
        im = ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(e.class_names)), e.class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(e.class_names)), e.class_names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if v > cm.max() / 2 else "black")
        ax.set_title(f"{e.kernel}: accuracy {s['accuracy']:.3f}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out_dir / f"confusion_{e.kernel}.png", dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(len(summaries), 1)
    for n, s in enumerate(summaries):
        axes[0].bar(np.arange(4) + n * width, s["accuracy_rotated"], width, label=s["kernel"])
        axes[1].bar(np.arange(1, 5) + n * width, np.asarray(s["orbit_same_predictions_hist"]) / max(s["n_test"], 1),
                    width, label=s["kernel"])
    axes[0].set_xticks(np.arange(4) + width * (len(summaries) - 1) / 2, ["0°", "90°", "180°", "270°"])
    axes[0].set_ylabel("accuracy")
    axes[0].set_title("accuracy on rotated test tiles")
    axes[1].set_xticks(np.arange(1, 5) + width * (len(summaries) - 1) / 2, ["1", "2", "3", "4"])
    axes[1].set_xlabel("rotations with the unrotated prediction (of 4)")
    axes[1].set_ylabel("fraction of tiles")
    axes[1].set_title("orbit-same-predictions")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "rotation_robustness.png", dpi=120)
    plt.close(fig)

    if any(s.get("rotation_sweep") for s in summaries):
        plot_sweep(summaries, out_dir / "rotation_sweep.png")
    (out_dir / "report.md").write_text(markdown_report(title, context, summaries))
    return report


def plot_sweep(summaries: list[dict], path: Path) -> None:
    """Polar plots of accuracy and agreement with the unrotated prediction against the angle."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), subplot_kw={"projection": "polar"})
    for s in summaries:
        sweep = s.get("rotation_sweep")
        if not sweep:
            continue
        theta = np.radians(sweep["angles"] + [360.0])
        for ax, key in zip(axes, ("accuracy", "agreement")):
            values = sweep["sets"]["test"][key]
            ax.plot(theta, values + values[:1], marker="o", ms=3, label=s["kernel"])
    for ax, title in zip(axes, ("accuracy on disk-masked rotated tiles", "agreement with the unrotated prediction")):
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, loc="lower left", bbox_to_anchor=(-0.15, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_markdown(summaries: list[dict]) -> list[str]:
    """Report sections of the rotation sweep: table by angle, orbit-same of |G| per set, invariance error."""
    done = [s for s in summaries if s.get("rotation_sweep")]
    if not done:
        return []
    first = done[0]["rotation_sweep"]
    angles = first["angles"]
    lines = ["## Rotations at every angle", "",
             f"Tiles disk-masked and rotated by P_θ (bicubic on the disk, the interpolation of the C8/C16 kernels "
             f"and ensembles) every {first['step']:g}°; {first['sets']['test']['n']} test tiles. *agreement*: "
             f"fraction of tiles whose prediction equals that of the unrotated disk-masked tile.", ""]
    rows = [["kernel", "measure"] + [f"{a:g}°" for a in angles]]
    for s in done:
        test = s["rotation_sweep"]["sets"]["test"]
        rows.append([s["kernel"], "accuracy"] + [f"{v:.2f}" for v in test["accuracy"]])
        rows.append([s["kernel"], "agreement"] + [f"{v:.2f}" for v in test["agreement"]])
    lines += markdown_table(rows) + ["", "Plot: `rotation_sweep.png`.", "",
                                "## Orbit-same-predictions of |G| (layout of Gerken & Kessel 2024, Table 1)", ""]
    set_names = list(first["sets"])
    titles = {"test": "test", "ood": "OOD tiles", "noise": "OOD noise"}
    rows = [["kernel"] + [f"{g} {titles.get(n, n)} (of {g[1:]})" for n in set_names for g in ORBIT_GROUPS]]
    for s in done:
        sets = s["rotation_sweep"]["sets"]
        rows.append([s["kernel"]] + [f"{sets[n]['orbit_same'][g]:.2f}" for n in set_names for g in ORBIT_GROUPS])
    lines += markdown_table(rows) + ["", "## Invariance error (mean ‖f(P_g x) − f(x)‖ over g ≠ e, in target norms)", ""]
    rows = [["kernel"] + [f"{g} {titles.get(n, n)}" for n in set_names for g in ORBIT_GROUPS]
            + ["kernel invariance error (training tiles)"]]
    for s in done:
        sw = s["rotation_sweep"]
        k = sw.get("kernel_invariance_error")
        rows.append([s["kernel"]] + [f"{sw['sets'][n]['invariance_error'][g]:.3f}" for n in set_names
                                     for g in ORBIT_GROUPS]
                    + [f"{k['max']:.2e} (max over {', '.join(k['by_angle'])}°)" if k else "exact or n/a"])
    lines += markdown_table(rows) + ["", "The C4 columns are exact for every C4/D4/C8/C16 kernel (quarter turns permute "
                                "the disk). Off the grid the averaged kernels are exact averages over the "
                                "interpolated rotations, but a fresh rotation P_a composes with them only "
                                "approximately (P_g P_a ≠ P_{ga}); the last column is that measured error of the "
                                "kernel, stored in the model file.", ""]
    return lines





def comparison_table(summaries: list[dict], extra: dict[str, dict] | None = None) -> list[list[str]]:
    """Rows of the side-by-side table (header first)."""
    rows = [["kernel", "accuracy", "acc. rotated", "orbit-same (of 4)", "max rel. change", "seconds"]]
    for s in summaries:
        seconds = (extra or {}).get(s["kernel"], {}).get("seconds")
        rows.append([s["kernel"], f"{s['accuracy']:.3f}", f"{s['accuracy_rotated_mean']:.3f}",
                     f"{s['orbit_same_predictions']:.2f}", f"{s['max_relative_output_change']:.1e}",
                     "" if seconds is None else f"{seconds:.1f}"])
    return rows


def markdown_report(title: str, context: dict, summaries: list[dict], extra: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    for k, v in context.items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Side by side", ""]
    rows = comparison_table(summaries, extra)
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---|" * len(rows[0]))
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["", "*acc. rotated*: mean accuracy on the tiles rotated by 90°, 180°, 270°. *orbit-same*: how many "
              "of the 4 rotations of a tile get the prediction of the unrotated tile (4.00 = invariant). "
              "*max rel. change*: largest ‖f(R·x) − f(x)‖/‖f(x)‖ of the output scores over all held-out tiles. "
              "The rotated copies are scored through the exact identity K(R·x, g·y) = K(x, R⁻¹g·y) of the CNN "
              "kernel, which makes an invariant kernel's change exactly 0 here; the *direct check* below "
              "recomputes a few rotated tiles from their pixels, and its deviation is the directly measured "
              "change for invariant models (float32 kernels, amplified by the ridge solve).", ""]
    for s in summaries:
        lines += [f"## {s['kernel']}", "",
                  f"- accuracy {s['accuracy']:.4f} on {s['n_test']} held-out tiles; by rotation 0/90/180/270°: "
                  + ", ".join(f"{a:.4f}" for a in s["accuracy_rotated"]),
                  f"- orbit-same-predictions {s['orbit_same_predictions']:.3f} of 4 "
                  f"(tiles with 1/2/3/4 agreeing rotations: {s['orbit_same_predictions_hist']})",
                  f"- largest relative output change under rotation {s['max_relative_output_change']:.2e}; "
                  f"direct check (rotated tiles recomputed from pixels vs the identity) {s['identity_check_max_rel_dev']:.1e}",
                  "- recall per class: " + ", ".join(f"{c} {r:.2f}" if r is not None and np.isfinite(r) else f"{c} –"
                                                    for c, r in s["per_class_recall"].items()),
                  f"- plots: `confusion_{s['kernel']}.png`, `rotation_robustness.png`", ""]
    lines += sweep_markdown(summaries)
    return "\n".join(lines) + "\n"
