"""Emergent equivariance on histology tiles: deep ensembles and equivariant kernels side by side.

Gerken & Kessel (ICML 2024) show that the mean of a deep ensemble trained with full data
augmentation is exactly equivariant (here: invariant) for every input, at any training time, in
the limit of infinitely many members; finite ensembles approach it as members are added. This
module measures that on real tiles, next to the kernels that describe the infinite-width limit:

- kernels (infinitely wide, infinitely many members): the plain CNN NTK (`cnn`), its group
  average (`cnn-c4avg`: the augmented ensemble) and the GCNN NTK (`p4cnn`), each the mean
  prediction μ_k after the same k gradient-descent steps as the finite networks (discrete formula);
- finite ensembles: CNNs without and with full augmentation (all |G| transformed copies of every
  training tile), and GCNNs, trained with the same k steps (learning rates matched so that all
  follow the same kernel time, see `eqkernels.ensembles`);
- per model: accuracy, orbit-same-predictions (of |G|) on the held-out tiles and on
  out-of-distribution inputs (tiles of another dataset, Gaussian noise images), the invariance
  error of the (ensemble) mean and its distance to μ_k; curves over the number of members; and a
  width study with centred networks showing the ensemble mean approach μ_k as the width grows.

Ensembles are repeated with independent members ("seeds"); tables give mean ± std over them.
The data split is fixed, so kernel rows, which are deterministic, have no spread.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from eqkernels import metrics
from eqkernels.ensembles import EnsembleSpec, size_curve, train
from eqkernels.errors import InputError
from eqkernels.groups import RotationGroup, get_group, resolve_group, rotate
from eqkernels.kernels import ConvNetSpec, KernelSpec
from eqkernels.kernels.families import family_kernels, left_translate
from eqkernels.kernels.relative import relative_kernels
from eqkernels.pipelines.compare_report import (format_value as _fmt, markdown_table as _table, mean_std,
                                                  plot_width_study, save_figure)
from eqkernels.pipelines.histology import Preprocessing, TileSet, load_tiles, stratified_split
from eqkernels.pipelines.histology_ensemble import HistologyEnsemble
from eqkernels.solvers import centred_one_hot, dual_coefficients

# (plain, averaged, GCNN twin or None, other kernels shown); C8…D16 act by interpolation on disk-masked tiles.
GROUP_KERNELS = {"C4": ("cnn", "cnn-c4avg", "p4cnn"), "D4": ("cnn", "cnn-d4avg", "d4cnn"),
                 "C8": ("cnn", "cnn-c8avg", None, "cnn-c4avg"), "C16": ("cnn", "cnn-c16avg", None, "cnn-c4avg"),
                 "D8": ("cnn", "cnn-d8avg", None, "cnn-d4avg"), "D16": ("cnn", "cnn-d16avg", None, "cnn-d4avg")}


def kernel_names(group: str) -> list[str]:
    """Every kernel family the comparison of `group` computes."""
    return [k for k in GROUP_KERNELS[group] if k is not None]


@dataclass
class CompareConfig:
    """Sizes of one comparison run. The defaults ran in about 3 minutes on 2 CPU cores."""

    size: int = 8                  # tiles are resized to size × size px (Kather-2016 tiles are 8 px)
    n_train: int = 100             # training tiles (class-stratified)
    n_test: int = 200              # held-out tiles
    n_ood: int = 100               # out-of-distribution tiles, and as many noise images
    group: str = "C4"
    width: int = 16                # CNN channels
    gcnn_width: int = 8            # GCNN channels per group element (|G|·8 = 32 feature maps)
    steps: int = 150               # gradient-descent steps (full batch unless batch_size)
    lr_scale: float = 1.0          # η = lr_scale / λ_max(Θ_cnn(X, X))
    batch_size: int | None = None
    members: int = 20              # members of one CNN ensemble
    gcnn_members: int = 10         # members of one GCNN ensemble
    seeds: int = 5                 # independent ensembles per model
    curve_sizes: tuple = (1, 2, 5, 10, 20, 50, 100)
    centred: bool = False          # train the compared ensembles as centred networks too
    widths: tuple = (16, 32, 64, 128)      # width study (centred CNNs, no augmentation)
    width_members: int = 4
    width_n_train: int = 40
    split_seed: int = 0
    member_chunk: int = 10         # members per compiled training step
    sweep: bool = True             # accuracy/agreement at every 15° on the test tiles (kernels and ensembles)

    def __post_init__(self):
        if self.group not in GROUP_KERNELS:
            raise InputError(f"--group must be one of {', '.join(GROUP_KERNELS)}, got {self.group!r}")
        try:
            resolve_group(self.group).check_size(self.size) if self.interpolated else None
        except ValueError as e:
            raise InputError(str(e)) from None
        positive = ("size", "n_train", "n_test", "width", "gcnn_width", "members", "gcnn_members", "seeds",
                    "width_members", "width_n_train", "member_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_ood < 0 or self.steps < 0:
            raise InputError("--n-ood and --steps must be >= 0")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise InputError(f"--lr-scale must be a positive number, got {self.lr_scale}")
        if any(w < 1 for w in self.widths) or not self.widths:
            raise InputError(f"--widths must be positive integers, got {self.widths}")
        try:
            ConvNetSpec().check_input_size(self.size)
        except ValueError as e:
            raise InputError(str(e)) from None

    @property
    def interpolated(self) -> bool:
        """True for groups acting by interpolation (every input is then disk-masked)."""
        return isinstance(resolve_group(self.group), RotationGroup)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------------- data

@dataclass
class Inputs:
    """Preprocessed inputs of one run: training tiles and every evaluation set (test first)."""

    class_names: list[str]
    preprocessing: Preprocessing
    train: TileSet
    x_train: np.ndarray
    y_train: np.ndarray                       # centred one-hot (N, C)
    test_labels: np.ndarray
    sets: dict[str, np.ndarray]               # name → preprocessed inputs (n, S, S, 3); "test" first
    descriptions: dict[str, str] = field(default_factory=dict)

    @property
    def x_eval(self) -> np.ndarray:
        return np.concatenate(list(self.sets.values()))

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, x in self.sets.items():
            out[name] = slice(start, start + len(x))
            start += len(x)
        return out


def load_inputs(config: CompareConfig, data: str | Path | None = None, ood: str | Path | None = None) -> Inputs:
    """Split the labelled tiles, fit the preprocessing, and prepare test and OOD inputs."""
    from eqkernels.datasets import KATHER2016_8X8, PATHMNIST_SAMPLE

    data_path = Path(data) if data is not None else PATHMNIST_SAMPLE
    tiles = load_tiles(data_path)
    if len(tiles.class_names) < 2 or np.any(tiles.labels < 0):
        raise InputError("need labelled tiles of at least two classes", data_path)
    if config.n_train + 1 > len(tiles):
        raise InputError(f"--n-train {config.n_train} leaves no held-out tiles of {len(tiles)}", data_path)
    train_idx, test_idx = stratified_split(tiles.labels, config.n_train, config.n_test, seed=config.split_seed)
    train_tiles, test_tiles = tiles.subset(train_idx), tiles.subset(test_idx)
    prep = Preprocessing.fit(train_tiles.images, config.size)
    sets = {"test": prep(test_tiles.images)}
    descriptions = {"test": f"{len(test_idx)} held-out tiles of {data_path.name}"}
    if config.n_ood:
        ood_path = Path(ood) if ood is not None else KATHER2016_8X8
        ood_tiles = load_tiles(ood_path)
        if len(ood_tiles) > config.n_ood:
            pick = stratified_split(ood_tiles.labels, config.n_ood, seed=config.split_seed)[0] \
                if len(set(ood_tiles.labels.tolist())) > 1 else np.arange(config.n_ood)
            ood_tiles = ood_tiles.subset(pick)
        name = "kather2016" if ood is None else "ood"
        sets[name] = prep(ood_tiles.images)
        side = ood_tiles.images.shape[1]
        resized = f"resized to {config.size} px" if side != config.size else "at their own size"
        descriptions[name] = (f"{len(ood_tiles)} tiles of {ood_path.name} ({side}×{side} px, {resized}, "
                              f"standardised with the training statistics)")
        rng = np.random.default_rng(config.split_seed + 12345)
        sets["noise"] = rng.standard_normal((config.n_ood, config.size, config.size, 3)).astype(np.float32)
        descriptions["noise"] = f"{config.n_ood} images of i.i.d. standard normal pixels"
    return Inputs(list(tiles.class_names), prep, train_tiles, prep(train_tiles.images),
                  centred_one_hot(train_tiles.labels, len(tiles.class_names)), np.asarray(test_tiles.labels),
                  sets, descriptions)


# --------------------------------------------------------------------------------------------- measures

def orbit_inputs(x: np.ndarray, group: str) -> np.ndarray:
    """(|G|·n, S, S, C): all transformed copies, element-major (identity first)."""
    orbit = resolve_group(group).orbit(np.asarray(x))
    return orbit.reshape((-1,) + orbit.shape[2:])


def target_norm(n_classes: int) -> float:
    """‖y‖ of every centred one-hot target: the unit of the invariance error."""
    return math.sqrt(1.0 - 1.0 / n_classes)


def invariance_error(orbit_scores: np.ndarray) -> float:
    """Mean ‖f(g·x) − f(x)‖ over inputs and g ≠ e, in units of a target's norm (scores (|G|, n, C))."""
    return metrics.mean_relative_change(orbit_scores, scale=target_norm(orbit_scores.shape[-1]))


def orbit_same(orbit_scores: np.ndarray) -> float:
    """Mean orbit-same-predictions of scores (|G|, n, C)."""
    return float(np.mean(metrics.orbit_same_predictions(np.argmax(orbit_scores, axis=-1))))


def measure(orbit_scores: np.ndarray, inputs: Inputs, reference: np.ndarray | None = None) -> dict:
    """Measures of one predictor from its scores on the orbits of every evaluation set, (|G|, n_all, C).

    `reference`: the kernel mean prediction μ_k on the same inputs, for the distance to it.
    """
    out = {}
    for name, sl in inputs.slices().items():
        scores = orbit_scores[:, sl]
        classes = np.argmax(scores, axis=-1)
        out[f"orbit_same_{name}"] = orbit_same(scores)
        out[f"invariance_error_{name}"] = invariance_error(scores)
        if reference is not None:
            out[f"distance_to_kernel_{name}"] = metrics.relative_distance(scores[0], reference[0, sl])
        if name == "test":
            out["accuracy"] = metrics.accuracy(inputs.test_labels, classes[0])
            out["accuracy_transformed"] = float(np.mean([metrics.accuracy(inputs.test_labels, c) for c in classes[1:]]))
    return out


# ---------------------------------------------------------------------------------------------- kernels

def kernel_part(config: CompareConfig, inputs: Inputs, net: ConvNetSpec, *, progress=None) -> dict:
    """Relative kernels over the group, the common learning rate η, and μ_k of every kernel family."""
    group = resolve_group(config.group)
    if isinstance(group, RotationGroup):
        from eqkernels.pipelines import histology_rotations

        return histology_rotations.kernel_part(config, inputs, net, group, kernel_names(config.group),
                                               progress=progress)
    t0 = time.perf_counter()
    rel_train = relative_kernels(net, inputs.x_train, None, group, progress=progress,
                                 description=f"train × train kernels ({group.name})")
    rel_eval = relative_kernels(net, inputs.x_eval, inputs.x_train, group, progress=progress,
                                description=f"evaluation × train kernels ({group.name})")
    seconds = time.perf_counter() - t0
    theta_plain = family_kernels(KernelSpec("cnn", net), rel_train)["ntk"]
    lambda_max = float(np.linalg.eigvalsh(theta_plain)[-1])
    eta = config.lr_scale / lambda_max
    out = {"eta": eta, "lambda_max": lambda_max, "seconds": seconds,
           "pairs": rel_train.stats["pairs"] + rel_eval.stats["pairs"], "models": {},
           "plain_eval_ntk": family_kernels(KernelSpec("cnn", net), rel_eval)["ntk"], "plain_train_ntk": theta_plain}
    test = inputs.slices()["test"]
    for name in kernel_names(config.group):
        spec = KernelSpec(name, net)
        k_train = family_kernels(spec, rel_train)["ntk"]
        alpha = dual_coefficients(k_train, inputs.y_train, ridge=0.0, time=config.steps, learning_rate=eta,
                                  discrete=True)
        # Scores of a·x for every element a, through K(a·x, y) = K(x, a⁻¹·y): no kernel is recomputed.
        k_orbit = [family_kernels(spec, left_translate(rel_eval, a))["ntk"] for a in range(group.order)]
        krr = dual_coefficients(k_train, inputs.y_train, ridge=1e-4)  # t = ∞, for reference
        out["models"][name] = {
            "orbit_scores": np.stack([k @ alpha for k in k_orbit]), "alpha": alpha,
            "accuracy_kernel_regression": metrics.accuracy(inputs.test_labels, np.argmax(k_orbit[0][test] @ krr, 1))}
    out["identity_check"] = _identity_check(net, inputs, group, out["models"]["cnn"])
    return out


def _identity_check(net: ConvNetSpec, inputs: Inputs, group, plain: dict) -> float:
    """Largest relative deviation between the plain kernel's scores of transformed test tiles obtained
    through the identity K(a·x, y) = K(x, a⁻¹·y) and recomputed from transformed pixels (2 tiles)."""
    x = inputs.sets["test"][:2]
    direct = relative_kernels(net, group.act(x, 1), inputs.x_train, "C1", progress=False)
    direct_scores = family_kernels(KernelSpec("cnn", net), direct)["ntk"] @ plain["alpha"]
    via = plain["orbit_scores"][1, :len(x)]
    return float(np.max(np.abs(direct_scores - via)) / max(np.max(np.abs(direct_scores)), 1e-30))


# ------------------------------------------------------------------------------------------------ plans

def pool_specs(config: CompareConfig, n_classes: int, eta: float) -> dict[str, EnsembleSpec]:
    """The ensemble pools (all seeds' members together), learning rates on one kernel time.

    The GCNN pool needs the group-convolution layers and is left out where they are missing.
    """
    net = ConvNetSpec(channels=config.width)
    # Full-orbit augmentation sees |G| copies per step (rate η/|G|); a fresh rotation per step one.
    order = 1 if config.interpolated else get_group(config.group).order
    common = dict(n_outputs=n_classes, steps=config.steps, batch_size=config.batch_size, centred=config.centred)
    pools = {
        "cnn": EnsembleSpec(net=net, members=config.seeds * config.members, learning_rate=eta, seed=1, **common),
        "cnn-aug": EnsembleSpec(net=net, members=config.seeds * config.members, learning_rate=eta / order,
                                augment=config.group, seed=2, **common),
    }
    if GROUP_KERNELS[config.group][2] is not None:
        pools["gcnn"] = EnsembleSpec(net=ConvNetSpec(channels=config.gcnn_width), architecture="gcnn",
                                     group=config.group, members=config.seeds * config.gcnn_members,
                                     learning_rate=eta, seed=3, **common)
    return pools


def matching_kernel(pool: str, group: str) -> str:
    """The kernel family whose μ_k the pool's ensemble mean approaches."""
    plain, averaged, gcnn = GROUP_KERNELS[group][:3]
    return {"cnn": plain, "cnn-aug": averaged, "gcnn": gcnn}[pool]


def training_macs(spec: EnsembleSpec, size: int, n_inputs: int) -> float:
    """Multiply-adds of the convolutions for one member over `n_inputs` images (cost model)."""
    net, q2 = spec.net, spec.net.filter_size ** 2
    copies = get_group(spec.group).order if spec.group else 1
    total, c_in, side = 0.0, 3, size
    for layer in range(net.depth):
        side = side - net.filter_size + 1 if net.padding == "VALID" else side
        fan_in = q2 * c_in * (copies if layer and spec.group else 1)
        total += side * side * fan_in * net.channels * copies
        c_in = net.channels
    return total * n_inputs


def plan_seconds(config: CompareConfig, n_classes: int, seconds_per_mac: float, pairs_per_second: float,
                 compile_seconds: float, n_eval: int) -> dict[str, float]:
    """Estimated seconds per stage for this configuration (from measured rates)."""
    group = resolve_group(config.group)
    order = group.order
    pools = pool_specs(config, n_classes, 1.0)
    if isinstance(group, RotationGroup):  # stacks of m fine angles over H; one pass per fine angle
        m, h = len(group.fine_angles), group.exact.order
        pairs = m * m * h * (config.n_train * (config.n_train + 1) / 2 + m * n_eval * config.n_train)
    else:
        pairs = config.n_train * (config.n_train + 1) / 2 * order + n_eval * config.n_train * order
    est = {"kernels": pairs / pairs_per_second}
    for name, spec in pools.items():
        n = config.n_train * spec.orbit_size
        steps_cost = spec.members * spec.steps * training_macs(spec, config.size, n)
        eval_cost = spec.members * training_macs(spec, config.size, order * n_eval) / 3  # forward only
        est[name] = (steps_cost + eval_cost) * seconds_per_mac + 2 * compile_seconds
    width_cost = sum(config.width_members * config.steps * training_macs(
        EnsembleSpec(net=ConvNetSpec(channels=w)), config.size, config.width_n_train) for w in config.widths)
    est["width study"] = width_cost * seconds_per_mac + len(config.widths) * compile_seconds
    return est


def fit_to_budget(config: CompareConfig, estimate, budget: float) -> tuple[CompareConfig, str]:
    """Shrink the member counts (then the widest widths) until the estimate fits in 90% of `budget`."""
    fitted, notes = config, []
    total = sum(estimate(fitted).values())
    if total <= 0.9 * budget:
        return fitted, f"estimated {total:.0f} s of a {budget:.0f} s budget: sizes as configured"
    while total > 0.9 * budget and (fitted.members > 2 or fitted.gcnn_members > 2):
        f = max(min(0.9 * budget / total, 0.9), 0.3)
        fitted = replace(fitted, members=max(2, int(fitted.members * f)),
                         gcnn_members=max(2, int(fitted.gcnn_members * f)))
        total = sum(estimate(fitted).values())
    while total > 0.9 * budget and len(fitted.widths) > 2:
        fitted = replace(fitted, widths=tuple(sorted(fitted.widths))[:-1])
        total = sum(estimate(fitted).values())
    if fitted.members != config.members or fitted.gcnn_members != config.gcnn_members:
        notes.append(f"members per ensemble reduced from {config.members} (CNN) / {config.gcnn_members} (GCNN) "
                     f"to {fitted.members} / {fitted.gcnn_members}")
    if fitted.widths != config.widths:
        notes.append(f"width study limited to widths {list(fitted.widths)}")
    over = " (still over: the smallest plan)" if total > 0.9 * budget else ""
    return fitted, f"estimated {total:.0f} s of a {budget:.0f} s budget after fitting{over}: " + "; ".join(notes)


def calibrate(config: CompareConfig, inputs: Inputs, eta: float) -> dict:
    """Measured seconds per multiply-add of training (a few steps of one augmented CNN chunk)."""
    spec = pool_specs(config, len(inputs.class_names), eta)["cnn-aug"]
    chunk = min(config.member_chunk, spec.members)
    probe = replace(spec, members=chunk, steps=3)
    ens = train(probe, inputs.x_train, inputs.y_train, member_chunk=chunk, progress=False)
    step_s = ens.timing["step_s"] or ens.seconds / max(probe.steps, 1)
    macs = chunk * training_macs(spec, config.size, len(inputs.x_train) * spec.orbit_size)
    return {"seconds_per_mac": step_s / macs, "compile_seconds": ens.timing["first_step_s"] or 0.0,
            "step_seconds": step_s, "member_chunk": chunk}


# -------------------------------------------------------------------------------------------------- run

def run(config: CompareConfig, *, data=None, ood=None, budget: float | None = None, progress=None,
        log=lambda message: None) -> dict:
    """Everything the report shows, as a dict of JSON-ready values plus arrays for the plots."""
    started = time.perf_counter()
    timings = {}
    inputs = load_inputs(config, data, ood)
    if config.interpolated:
        inputs = disk_masked(inputs)
    timings["data"] = time.perf_counter() - started
    n_classes = len(inputs.class_names)
    net = ConvNetSpec()
    group = resolve_group(config.group)

    budget_note = "no budget given: sizes as configured"
    calibration = None
    if budget is not None and budget > 0:
        t0 = time.perf_counter()
        from eqkernels.pipelines.histology_demo import measure_rate

        # η only scales the probe's learning rate; its cost does not depend on it.
        calibration = calibrate(config, inputs, 1e-3)
        rate = measure_rate(net, inputs.train.images, config.size)
        calibration["kernel_pairs_per_second"] = rate
        n_eval = len(inputs.x_eval)
        estimate = lambda c: plan_seconds(c, n_classes, calibration["seconds_per_mac"], rate,  # noqa: E731
                                          calibration["compile_seconds"], n_eval)
        spent = time.perf_counter() - started
        config, budget_note = fit_to_budget(config, estimate, budget - spent)
        calibration["estimate"] = estimate(config)
        timings["calibration"] = time.perf_counter() - t0
        log(f"plan: {budget_note}")

    t0 = time.perf_counter()
    kernels = kernel_part(config, inputs, net, progress=progress)
    timings["kernels"] = time.perf_counter() - t0
    eta = kernels["eta"]
    log(f"kernels: {kernels['pairs']:,} pairs in {kernels['seconds']:.0f} s; η = {eta:.3g} (1/λ_max × {config.lr_scale:g})")

    rows = {}
    for name, info in kernels["models"].items():
        rows[f"kernel {name}"] = {"kind": "kernel", "label": f"{name} NTK (μ_k)", "values": measure(info["orbit_scores"], inputs),
                      "accuracy_kernel_regression": info["accuracy_kernel_regression"]}

    from eqkernels.pipelines import histology_rotations as hr

    t0 = time.perf_counter()
    sweep = hr.start_sweep(kernels, inputs, net, group, progress=progress) if config.sweep else None
    timings["kernel sweep"] = time.perf_counter() - t0
    x_orbits = orbit_inputs(inputs.x_eval, config.group)
    n_eval = len(inputs.x_eval)
    curves, pools_info, saved = {}, {}, {}
    for pool, spec in pool_specs(config, n_classes, eta).items():
        t0 = time.perf_counter()
        ens = train(spec, inputs.x_train, inputs.y_train, member_chunk=min(config.member_chunk, spec.members),
                    progress=progress, description=f"training {spec.label} ensembles")
        outputs = ens.outputs(x_orbits).reshape(spec.members, group.order, n_eval, n_classes)
        reference = kernels["models"][matching_kernel(pool, config.group)]["orbit_scores"]
        per_seed = spec.members // config.seeds
        seeds = [measure(outputs[s * per_seed:(s + 1) * per_seed].mean(0), inputs, reference)
                 for s in range(config.seeds)]
        row = rows[f"ensemble {pool}"] = {"kind": "ensemble", "label": f"{spec.label} ensemble, {per_seed} members",
                                          "members": per_seed, "seeds": seeds, "values": mean_std(seeds)}
        # The first repeat is kept as a file that `eqk histology predict` reads.
        saved[pool] = HistologyEnsemble(ens.select(range(per_seed)), inputs.preprocessing, inputs.class_names,
                                        inputs.train.fingerprints(), {"source": "eqk compare", "pool": pool})
        sl = inputs.slices()
        curve = {}
        for set_name, s in sl.items():
            curve[f"invariance_error_{set_name}"] = size_curve(outputs[:, :, s], config.curve_sizes, invariance_error)
            curve[f"orbit_same_{set_name}"] = size_curve(outputs[:, :, s], config.curve_sizes, orbit_same)
        curve["distance_to_kernel_test"] = size_curve(
            outputs[:, 0, sl["test"]], config.curve_sizes,
            lambda m, ref=reference[0, sl["test"]]: metrics.relative_distance(m, ref))
        curves[pool] = curve
        if sweep:
            sweep["rows"][f"ensemble {pool}"] = hr.ensemble_sweep(ens, inputs, seeds=config.seeds)
        timings[f"ensembles {pool}"] = time.perf_counter() - t0
        pools_info[pool] = {"spec": spec.to_dict(), "label": spec.label, "seconds": time.perf_counter() - t0,
                            "train_seconds": ens.seconds, "timing": ens.timing,
                            "final_loss_mean": float(np.mean(ens.loss_history[-1])) if spec.steps else None,
                            "initial_loss_mean": float(np.mean(ens.loss_history[0])) if spec.steps else None}
        log(f"{spec.label}: {spec.members} members in {time.perf_counter() - t0:.0f} s; "
            f"accuracy {row['values']['accuracy'][0]:.3f}, orbit-same test "
            f"{row['values']['orbit_same_test'][0]:.2f}/{group.order}")

    t0 = time.perf_counter()
    width_study = run_width_study(config, inputs, kernels, progress=progress)
    timings["width study"] = time.perf_counter() - t0
    log("width study: " + ", ".join(f"{w}: {d:.3f}" for w, d in zip(width_study["widths"],
                                                                     width_study["distance_mean"])))
    timings["total"] = time.perf_counter() - started
    return {"config": config.to_dict(), "group": config.group, "group_order": group.order,
            "classes": inputs.class_names, "sets": inputs.descriptions,
            "eta": eta, "lambda_max": kernels["lambda_max"], "kernel_pairs": kernels["pairs"],
            "identity_check": kernels["identity_check"], "rows": rows, "curves": curves, "pools": pools_info,
            "sweep": sweep, "interpolated": config.interpolated,
            "width_study": width_study, "budget": budget, "budget_note": budget_note, "calibration": calibration,
            "timings": timings, "ensembles": saved}


def disk_masked(inputs: Inputs) -> Inputs:
    """The same inputs with every tile (and noise image) disk-masked, P_0 x: what C_n/D_n act on."""
    mask = lambda x: rotate(np.asarray(x, np.float32), 0.0)  # noqa: E731
    return replace(inputs, x_train=mask(inputs.x_train), sets={k: mask(v) for k, v in inputs.sets.items()})


def run_width_study(config: CompareConfig, inputs: Inputs, kernels: dict, *, progress=None) -> dict:
    """Centred CNN ensembles of growing width on a subset of the training tiles: distance of the ensemble
    mean (and of single members) to the plain CNN's μ_k on the held-out tiles."""
    n_sub = min(config.width_n_train, len(inputs.x_train))
    labels = inputs.train.labels
    if n_sub < len(labels):
        idx = stratified_split(labels, n_sub, seed=config.split_seed)[0]
    else:
        idx = np.arange(len(labels))
    theta = kernels["plain_train_ntk"][np.ix_(idx, idx)]
    eta = config.lr_scale / float(np.linalg.eigvalsh(theta)[-1])
    y = inputs.y_train[idx]
    alpha = dual_coefficients(theta, y, ridge=0.0, time=config.steps, learning_rate=eta, discrete=True)
    test = inputs.slices()["test"]
    mu = kernels["plain_eval_ntk"][test][:, idx] @ alpha
    x_test = inputs.sets["test"]
    out = {"n_train": int(n_sub), "eta": eta, "members": config.width_members, "widths": [], "distance_mean": [],
           "distance_member_mean": [], "distance_member_std": [], "seconds": []}
    for width in sorted(config.widths):
        t0 = time.perf_counter()
        spec = EnsembleSpec(net=ConvNetSpec(channels=int(width)), n_outputs=len(inputs.class_names),
                            members=config.width_members, steps=config.steps, learning_rate=eta, centred=True,
                            batch_size=config.batch_size, seed=100 + int(width))
        ens = train(spec, inputs.x_train[idx], y, member_chunk=min(config.member_chunk, spec.members),
                    progress=progress, description=f"width {width}: training centred CNNs")
        outputs = ens.outputs(x_test)
        member = [metrics.relative_distance(o, mu) for o in outputs]
        out["widths"].append(int(width))
        out["distance_mean"].append(metrics.relative_distance(outputs.mean(0), mu))
        out["distance_member_mean"].append(float(np.mean(member)))
        out["distance_member_std"].append(float(np.std(member)))
        out["seconds"].append(time.perf_counter() - t0)
    return out



# ---------------------------------------------------------------------------------------------- report

SET_TITLES = {"test": "test", "kather2016": "OOD Kather-2016", "ood": "OOD tiles", "noise": "OOD noise"}


def headline_rows(summary: dict) -> list[list[str]]:
    """Header and rows of the headline table (orbit-same of |G|, accuracy; mean ± std over repeats)."""
    order = summary["group_order"]
    sets = list(summary["sets"])
    header = ["model", "accuracy"] + [f"orbit-same {SET_TITLES.get(s, s)} (of {order})" for s in sets]
    rows = [header]
    for name, row in summary["rows"].items():
        v = row["values"]
        rows.append([row["label"], _fmt(v["accuracy"])] + [_fmt(v[f"orbit_same_{s}"], 2) for s in sets])
    return rows


def invariance_rows(summary: dict) -> list[list[str]]:
    sets = list(summary["sets"])
    header = ["model"] + [f"invariance error {SET_TITLES.get(s, s)}" for s in sets] + ["‖mean − μ_k‖/‖μ_k‖ test",
                                                                                      "acc. transformed"]
    rows = [header]
    for name, row in summary["rows"].items():
        v = row["values"]
        rows.append([row["label"]] + [_fmt(v[f"invariance_error_{s}"]) for s in sets]
                    + [_fmt(v.get("distance_to_kernel_test")), _fmt(v["accuracy_transformed"])])
    return rows


def summary_lines(summary: dict) -> list[str]:
    """The main numbers in words: what adding members did with and without augmentation, and the width study."""
    out = []
    sets = list(summary["sets"])
    curves = summary["curves"]
    for pool in ("cnn-aug", "cnn"):
        if pool not in curves:
            continue
        label = summary["pools"][pool]["label"]
        parts = []
        for s in sets:
            c = curve_ends(curves[pool][f"invariance_error_{s}"])
            if c:
                parts.append(f"{SET_TITLES.get(s, s)} {c[1]:.3f} → {c[3]:.3f}")
        c = curve_ends(curves[pool]["invariance_error_test"])
        if c:
            out.append(f"- **{label}**: invariance error of the ensemble mean from {c[0]} to {c[2]} members: "
                       + ", ".join(parts) + f" (1/√members would give ×{math.sqrt(c[0] / c[2]):.2f})")
    avg = summary["rows"].get(f"kernel {GROUP_KERNELS[summary['group']][1]}")
    plain = summary["rows"].get(f"kernel {GROUP_KERNELS[summary['group']][0]}")
    if avg and plain:
        out.append("- **infinite ensembles (kernels)**: without augmentation invariance error "
                   + ", ".join(f"{SET_TITLES.get(s, s)} {plain['values'][f'invariance_error_{s}']:.3f}" for s in sets)
                   + f"; with augmentation {max(avg['values'][f'invariance_error_{s}'] for s in sets):.1e} "
                   + ("(off the grid: the interpolation's composition defect)" if summary.get("interpolated")
                      else "(exact)"))
    gcnn = summary["rows"].get("ensemble gcnn")
    if gcnn:
        worst = max(gcnn["values"][f"invariance_error_{s}"][0] for s in sets)
        out.append(f"- **GCNN ensemble**: invariant to float precision (largest invariance error {worst:.1e})")
    w = summary["width_study"]
    if len(w["widths"]) > 1:
        out.append(f"- **width study** (centred): distance of the ensemble mean to μ_k {w['distance_mean'][0]:.3f} at "
                   f"width {w['widths'][0]} → {w['distance_mean'][-1]:.3f} at width {w['widths'][-1]}")
    return out


def curve_ends(curve: dict):
    """(first size, its mean, last size, its mean) of a size curve, or None when it is empty."""
    if not curve["sizes"]:
        return None
    return curve["sizes"][0], curve["mean"][0], curve["sizes"][-1], curve["mean"][-1]


def markdown(summary: dict) -> str:
    c, order, group = summary["config"], summary["group_order"], summary["group"]
    kernels = GROUP_KERNELS[group]
    t = summary["timings"]
    lines = [f"# eqk compare: emergent equivariance on histology tiles ({group}, |G| = {order})", "",
             f"Run time **{t['total']:.0f} s** ({summary['budget_note']}).", ""]
    lines += ["## Set-up", "",
              f"- **training tiles**: {c['n_train']} (class-stratified, split seed {c['split_seed']}), "
              f"{c['size']}×{c['size']} px, {len(summary['classes'])} classes"]
    lines += [f"- **{SET_TITLES.get(k, k)}**: {v}" for k, v in summary["sets"].items()]
    lines += [f"- **network**: 2× conv3×3 VALID → ReLU → global average pool → linear readout, NTK "
              f"parametrisation (weights √2, readout 1, no biases); CNN width {c['width']} channels, GCNN "
              f"({group}) {c['gcnn_width']} channels per group element",
              f"- **training**: {c['steps']} steps of "
              + ("full-batch gradient descent" if c["batch_size"] is None else f"SGD (minibatches of {c['batch_size']})")
              + f" on ½Σ‖f(x)−y‖² with centred one-hot targets; η = {summary['eta']:.4g} = {c['lr_scale']:g}/λ_max "
              f"(λ_max = {summary['lambda_max']:.4g}, largest eigenvalue of the plain NTK on the training tiles); "
              + _augmentation_note(summary),
              f"- **kernels**: the mean prediction μ_k = Θ(x,X) Θ⁻¹ (I − (I − ηΘ)^k) Y after the same k = {c['steps']} "
              f"discrete gradient-descent steps (the discrete formula, not exp(−ηΘk), so finite and infinite "
              f"networks are compared at the same step); `{kernels[1]}` is the infinite augmented ensemble"
              + (f", `{kernels[2]}` the infinite GCNN (equal to `{kernels[1]}` for a linear readout)" if kernels[2]
                 else f" up to the interpolation's composition defect (the double average over the interpolated "
                      f"rotations, exactly invariant under the quarter turns only); `{kernels[3]}` for reference"),
              f"- **ensembles**: {c['seeds']} independent ensembles per model (\"seeds\"; mean ± std over them) of "
              + " / ".join(f"{row['members']} {summary['pools'][key.split(' ', 1)[1]]['label']}"
                           for key, row in summary["rows"].items() if row["kind"] == "ensemble") + " members",
              f"- transformed-tile kernels come from the identity K(a·x, y) = K(x, a⁻¹·y); recomputed from "
              f"pixels for 2 tiles: max relative deviation {summary['identity_check']:.1e}", ""]
    lines += ["## Summary", ""] + summary_lines(summary) + [""]
    lines += [f"## Headline (in the form of Gerken & Kessel 2024): orbit-same-predictions of {order} and accuracy", ""]
    lines += _table(headline_rows(summary))
    lines += ["", f"*orbit-same*: of the {order} transformed copies of an input, how many get the prediction of the "
              f"untransformed input ({order} = invariant), averaged over inputs. Kernel rows are deterministic given the "
              f"data (no spread).", "", "## Invariance error and distance to the kernel", ""]
    lines += _table(invariance_rows(summary))
    lines += ["", "*invariance error*: mean over inputs and non-identity elements g of ‖f(g·x) − f(x)‖ of the (ensemble) "
              "mean, in units of the norm of a target (centred one-hot, √(1 − 1/C)); 0 = invariant. One fixed unit keeps "
              "ensembles of every size comparable. *‖mean − μ_k‖/‖μ_k‖*: distance of the ensemble mean on the "
              "held-out tiles to the mean prediction of the matching kernel (cnn → "
              f"{kernels[0]}, augmented → {kernels[1]}, GCNN → {kernels[2]}).", ""]
    if summary.get("sweep"):
        from eqkernels.pipelines.histology_rotations import sweep_markdown

        lines += sweep_markdown(summary["sweep"], {k: v["label"] for k, v in summary["rows"].items()})
    lines += ["## Over the number of members", "",
              "Members of all repeats pooled; each size is averaged over disjoint ensembles from the pool.", ""]
    for metric, title in (("invariance_error_test", "invariance error, test"),
                          ("invariance_error_" + list(summary["sets"])[-1], "invariance error, "
                           + SET_TITLES.get(list(summary["sets"])[-1], "")),
                          ("orbit_same_" + (list(summary["sets"])[1] if len(summary["sets"]) > 1 else "test"),
                           "orbit-same, " + SET_TITLES.get(list(summary["sets"])[1] if len(summary["sets"]) > 1
                                                           else "test", "")),
                          ("distance_to_kernel_test", "‖mean − μ_k‖/‖μ_k‖, test")):
        sizes = sorted({m for curve in summary["curves"].values() for m in curve[metric]["sizes"]})
        rows = [[title + " / members"] + [str(m) for m in sizes]]
        for pool, curve in summary["curves"].items():
            values = dict(zip(curve[metric]["sizes"], zip(curve[metric]["mean"], curve[metric]["std"])))
            rows.append([summary["pools"][pool]["label"]] + [_fmt(list(values[m])) if m in values else "–"
                                                            for m in sizes])
        lines += _table(rows) + [""]
    lines += ["Plots: `members.png`.", ""]
    w = summary["width_study"]
    lines += ["## Width study: centred networks approach μ_k", "",
              f"Centred CNNs f(x;θ) − f(x;θ₀) without augmentation, {w['members']} members per width, {w['n_train']} "
              f"training tiles, the same {c['steps']} steps at η = {w['eta']:.4g} (1/λ_max of their training kernel × "
              f"{c['lr_scale']:g}); distance to the plain NTK's μ_k on the held-out tiles. A plain (uncentred) "
              "ensemble's mean also carries its members' random initial functions, which average out only as "
              "1/√members and would hide the width; centring removes them exactly, so what is left is the "
              "finite-width effect.", ""]
    rows = [["width", "‖ensemble mean − μ_k‖/‖μ_k‖", "single member (mean ± std)", "seconds"]]
    for i, width in enumerate(w["widths"]):
        rows.append([str(width), f"{w['distance_mean'][i]:.4f}",
                     f"{w['distance_member_mean'][i]:.4f} ± {w['distance_member_std'][i]:.4f}", f"{w['seconds'][i]:.0f}"])
    lines += _table(rows) + ["", "Plot: `width.png`.", ""]
    lines += ["## Time", ""]
    lines += _table([["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in t.items()])
    lines += ["", "Ensemble files (first repeat of each model) for `eqk histology predict`: "
              + ", ".join(f"`ensembles/{p}.h5`" for p in summary["curves"]) + ".", ""]
    return "\n".join(lines) + "\n"


def _augmentation_note(summary: dict) -> str:
    """How the augmented CNNs were trained, and why their learning rate puts them on the kernel time."""
    order = summary["group_order"]
    if summary.get("interpolated"):
        return (f"all tiles disk-masked; augmented CNNs see a fresh interpolated rotation P_g (g uniform in "
                f"{summary['group']}) of every tile at every step at η: in expectation full-orbit training at η/{order}, "
                f"the kernel time of the averaged kernel at η")
    return (f"augmented CNNs see all {order} transformed copies of every tile at η/{order}, which puts them on the "
            f"same kernel time (their training kernel acts as {order}·Θ_avg on orbit-constant targets)")


def plot(summary: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summary["sets"])
    styles = {"test": "-", sets[-1]: ":"} | ({sets[1]: "--"} if len(sets) > 2 else {})
    colours = {"cnn": "tab:red", "cnn-aug": "tab:blue", "gcnn": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for pool, curve in summary["curves"].items():
        label = summary["pools"][pool]["label"]
        for s in sets:
            c = curve[f"invariance_error_{s}"]
            if pool == "gcnn":  # exactly invariant: float noise only, keep the log axis readable
                continue
            axes[0].errorbar(c["sizes"], c["mean"], yerr=c["std"], ls=styles.get(s, "-"), color=colours[pool],
                             marker="o", ms=3, capsize=2, label=f"{label}, {SET_TITLES.get(s, s)}")
        for s in sets[1:] or sets:
            c = curve[f"orbit_same_{s}"]
            axes[1].errorbar(c["sizes"], c["mean"], yerr=c["std"], ls=styles.get(s, "-"), color=colours[pool],
                             marker="o", ms=3, capsize=2, label=f"{label}, {SET_TITLES.get(s, s)}")
        c = curve["distance_to_kernel_test"]
        axes[2].errorbar(c["sizes"], c["mean"], yerr=c["std"], color=colours[pool], marker="o", ms=3, capsize=2,
                         label=label)
    aug = summary["curves"]["cnn-aug"]["invariance_error_test"]
    if aug["sizes"]:
        m = np.asarray(aug["sizes"], float)
        axes[0].plot(m, aug["mean"][0] / np.sqrt(m), color="grey", lw=0.8, label="1/√members")
    axes[0].set(xscale="log", yscale="log", xlabel="members", ylabel="invariance error of the ensemble mean",
                title="invariance error")
    axes[1].set(xscale="log", xlabel="members", ylabel=f"orbit-same (of {summary['group_order']})",
                title="orbit-same-predictions, OOD inputs")
    axes[2].set(xscale="log", yscale="log", xlabel="members", ylabel="‖mean − μ_k‖/‖μ_k‖ (test)",
                title="distance to the kernel mean prediction")
    save_figure(fig, axes, out_dir / "members.png")

    if summary.get("sweep"):
        from eqkernels.pipelines.histology_rotations import plot_sweep

        plot_sweep(summary["sweep"], {k: v["label"] for k, v in summary["rows"].items()}, out_dir / "rotation_sweep.png")
    plot_width_study(summary["width_study"], out_dir / "width.png", xlabel="width (channels)",
                     ylabel="‖f − μ_k‖/‖μ_k‖ (test)",
                     title="centred CNNs approach the NTK mean prediction")


def write_report(summary: dict, out_dir: str | Path) -> dict:
    """report.md, report.json, members.png, width.png and ensembles/*.h5 in `out_dir`; returns the JSON."""
    from eqkernels.apps._common import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensembles = summary.pop("ensembles", {})
    for pool, ens in ensembles.items():
        ens.save(out_dir / "ensembles" / f"{pool}.h5")
    summary["headline"] = headline_rows(summary)
    write_json(out_dir / "report.json", summary)
    plot(summary, out_dir)
    (out_dir / "report.md").write_text(markdown(summary))
    return summary
