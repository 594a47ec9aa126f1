"""`eqk compare --group C8|C16|D8|D16`: the kernel side for rotations off the pixel grid, and the
rotation sweep (every 15°) of kernels and ensembles.

Every input is disk-masked (P_0 x); the group's elements are h·P_φ (h in C4/D4, φ a fine angle).
The averaged kernel K_G is exactly invariant under h, so its scores on the orbit need one
relative-kernel pass per fine angle φ over stacked inputs P_ψ(P_φ x), and the quarter turns come
from the identity K(h·x, y) = K(x, h⁻¹·y). The plain `cnn` and `cnn-c4avg` kernels (of the masked
tiles) come out of the same passes as their φ = ψ = 0 blocks.
"""
from __future__ import annotations

import time

import numpy as np

from eqkernels import metrics
from eqkernels.groups import RotationGroup, get_group, rotate
from eqkernels.kernels import ConvNetSpec, KernelSpec
from eqkernels.kernels.families import family_kernels, left_translate
from eqkernels.kernels.relative import RelativeKernels, rotation_relative_kernels
from eqkernels.solvers import dual_coefficients

SWEEP_STEP = 15.0


def sweep_angles(step: float = SWEEP_STEP) -> list[float]:
    """0°, step, 2·step, … below 360° (step must divide 360°)."""
    n = int(round(360.0 / step)) if step > 0 else 0
    if n < 1 or abs(n * step - 360.0) > 1e-9:
        raise ValueError(f"the angle step must divide 360°, got {step:g}°")
    return [360.0 * i / n for i in range(n)]


def _residual_pass(net: ConvNetSpec, x: np.ndarray, x_train: np.ndarray, group, residual: float,
                   progress) -> RelativeKernels:
    """Relative kernels of P_residual x against the training tiles: over H between stacks for an
    interpolated group, over the exact group itself (C4, D4) otherwise."""
    moved = rotate(np.asarray(x, np.float32), residual)
    description = f"evaluation at {residual:g}° × train ({group.name})"
    if isinstance(group, RotationGroup):
        return rotation_relative_kernels(net, moved, x_train, group, progress=progress, description=description)
    from eqkernels.kernels.relative import relative_kernels

    return relative_kernels(net, moved, x_train, group, progress=progress, description=description)


def _scores(spec: KernelSpec, rel: RelativeKernels, element: int, alpha: np.ndarray) -> np.ndarray:
    """μ_k scores of h·x (h = element number `element` of rel's exact group) from rel of x."""
    return family_kernels(spec, left_translate(rel, element) if element else rel)["ntk"] @ alpha


def kernel_part(config, inputs, net: ConvNetSpec, group: RotationGroup, kernel_names, *, progress=None) -> dict:
    """As `histology_compare.kernel_part` for an interpolated group: η, μ_k orbit scores of each kernel."""
    t0 = time.perf_counter()
    rel_train = rotation_relative_kernels(net, inputs.x_train, None, group, progress=progress,
                                          description=f"train × train kernels ({group.name})")
    passes = {phi: _residual_pass(net, inputs.x_eval, inputs.x_train, group, phi, progress)
              for phi in group.fine_angles}
    seconds = time.perf_counter() - t0
    plain = KernelSpec("cnn", net)
    theta_plain = family_kernels(plain, rel_train)["ntk"]
    lambda_max = float(np.linalg.eigvalsh(theta_plain)[-1])
    eta = config.lr_scale / lambda_max
    out = {"eta": eta, "lambda_max": lambda_max, "seconds": seconds,
           "pairs": rel_train.stats["pairs"] + sum(r.stats["pairs"] for r in passes.values()), "models": {},
           "plain_eval_ntk": family_kernels(plain, passes[0.0])["ntk"], "plain_train_ntk": theta_plain,
           "alphas": {}}
    test = inputs.slices()["test"]
    for name in kernel_names:
        spec = KernelSpec(name, net)
        k_train = family_kernels(spec, rel_train)["ntk"]
        alpha = dual_coefficients(k_train, inputs.y_train, ridge=0.0, time=config.steps, learning_rate=eta,
                                  discrete=True)
        orbit = np.stack([_scores(spec, passes[phi], h, alpha)
                          for h, phi in (group.split(g) for g in range(group.order))])
        krr = dual_coefficients(k_train, inputs.y_train, ridge=1e-4)
        k0 = family_kernels(spec, passes[0.0])["ntk"]
        out["models"][name] = {"orbit_scores": orbit, "alpha": alpha,
                               "accuracy_kernel_regression": metrics.accuracy(inputs.test_labels,
                                                                              np.argmax(k0[test] @ krr, 1))}
    out["identity_check"] = _identity_check(net, inputs, group, out["models"]["cnn"])
    out["passes"] = passes
    return out


def _identity_check(net: ConvNetSpec, inputs, group: RotationGroup, plain: dict) -> float:
    """Plain-kernel scores of quarter-turned test tiles via the identity vs recomputed from pixels (2 tiles)."""
    from eqkernels.kernels.relative import relative_kernels

    x = inputs.sets["test"][:2]
    quarter = len(group.fine_angles)  # element number of rot90·P_0
    direct = relative_kernels(net, group.act(x, quarter), inputs.x_train, "C1", progress=False)
    direct_scores = family_kernels(KernelSpec("cnn", net), direct)["ntk"] @ plain["alpha"]
    via = plain["orbit_scores"][quarter, :len(x)]
    return float(np.max(np.abs(direct_scores - via)) / max(np.max(np.abs(direct_scores)), 1e-30))


def kernel_sweep(kernels: dict, inputs, net: ConvNetSpec, group, *, step: float = SWEEP_STEP,
                 progress=None) -> dict[str, np.ndarray]:
    """Scores (angles, n_test, C) of every kernel model at P_θ x_test, θ every `step` degrees.

    `group`: the comparison's group (C4/D4 exact, or interpolated); residual passes of its own
    orbit computation are reused where `kernels` holds them.
    """
    angles = sweep_angles(step)
    test = inputs.slices()["test"]
    exact = group.exact if isinstance(group, RotationGroup) else group
    quarter = {k: get_group(exact.name).elements.index((0, k)) for k in range(4)}
    out = {name: np.empty((len(angles), test.stop - test.start, len(inputs.class_names)))
           for name in kernels["models"]}
    for r in sorted({a % 90.0 for a in angles}):
        rel = kernels.get("passes", {}).get(r)
        rows = slice(None) if rel is None else test
        if rel is None:
            rel = _residual_pass(net, inputs.sets["test"], inputs.x_train, group, r, progress)
        for i, a in enumerate(angles):
            if a % 90.0 != r:
                continue
            element = quarter[int(round((a - r) / 90.0)) % 4]
            for name, info in kernels["models"].items():
                out[name][i] = _scores(KernelSpec(name, net), rel, element, info["alpha"])[rows]
    return out


def start_sweep(kernels: dict, inputs, net: ConvNetSpec, group, *, step: float = SWEEP_STEP, progress=None) -> dict:
    """A comparison's sweep record with the kernel rows filled in (`kernel_sweep`, `sweep_measures`)."""
    scores = kernel_sweep(kernels, inputs, net, group, step=step, progress=progress)
    return {"step": step, "angles": sweep_angles(step),
            "rows": {f"kernel {name}": sweep_measures(s, inputs.test_labels) for name, s in scores.items()}}


def ensemble_sweep(ensemble, inputs, *, step: float = SWEEP_STEP, seeds: int = 1) -> dict:
    """Accuracy and agreement per angle of the ensemble means of each repeat (seed) of the pool on the
    test tiles rotated by P_θ: per-angle mean and std over the repeats (`sweep_mean_std`)."""
    angles = sweep_angles(step)
    x_test = np.asarray(inputs.sets["test"], np.float32)
    moved = np.concatenate([rotate(x_test, a) for a in angles])
    outputs = ensemble.outputs(moved).reshape(ensemble.members, len(angles), len(x_test), -1)
    per = ensemble.members // seeds
    return sweep_mean_std([sweep_measures(outputs[s * per:(s + 1) * per].mean(0), inputs.test_labels)
                           for s in range(seeds)])


def sweep_measures(scores: np.ndarray, labels: np.ndarray) -> dict:
    """{'accuracy': per angle, 'agreement': per angle with the prediction at 0°} from scores (angles, n, C)."""
    classes = np.argmax(scores, axis=-1)
    return {"accuracy": [metrics.accuracy(labels, c) for c in classes],
            "agreement": [float(np.mean(c == classes[0])) for c in classes]}


def sweep_mean_std(measures: list[dict]) -> dict:
    """Per-angle mean and std over repeats of `sweep_measures` results: {key: means, key_std: stds}."""
    out = {}
    for key in measures[0]:
        values = np.asarray([m[key] for m in measures], dtype=float)
        out[key], out[f"{key}_std"] = values.mean(0).tolist(), values.std(0).tolist()
    return out


def sweep_markdown(sweep: dict, labels: dict[str, str]) -> list[str]:
    """Markdown section of a comparison's rotation sweep (means; the JSON holds the spread)."""
    from eqkernels.pipelines.compare_report import markdown_table

    angles = sweep["angles"]
    rows = [["model", "measure"] + [f"{a:g}°" for a in angles]]
    for key, row in sweep["rows"].items():
        for measure in ("accuracy", "agreement"):
            rows.append([labels.get(key, key), measure] + [f"{v:.2f}" for v in row[measure]])
    return (["## Rotations at every angle (test tiles)", "",
             f"Test tiles disk-masked and rotated by P_θ (bicubic on the disk, the interpolation of the kernels "
             f"and of the augmentation) every {sweep['step']:g}°; *agreement* with the prediction at 0°. Ensembles: "
             "mean over repeats (std in report.json).", ""] + markdown_table(rows) + ["", "Plot: `rotation_sweep.png`.", ""])


def plot_sweep(sweep: dict, labels: dict[str, str], path) -> None:
    """Accuracy and agreement against the angle (line plots, error bars over repeats) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eqkernels.pipelines.compare_report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, row in sweep["rows"].items():
        for ax, measure in zip(axes, ("accuracy", "agreement")):
            ax.errorbar(sweep["angles"], row[measure], yerr=row.get(f"{measure}_std"), marker="o", ms=3, capsize=2,
                        ls="--" if key.startswith("kernel") else "-", label=labels.get(key, key))
    for ax, measure in zip(axes, ("accuracy", "agreement with 0°")):
        ax.set(xlabel="rotation (degrees)", ylabel=measure, xticks=range(0, 361, 45))
    save_figure(fig, axes, path)
