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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from eqkernels import metrics
from eqkernels.ensembles import EnsembleSpec, train
from eqkernels.errors import InputError
from eqkernels.groups import RotationGroup, get_group, resolve_group, rotate
from eqkernels.kernels import ConvNetSpec, KernelSpec
from eqkernels.kernels.families import family_kernels, left_translate
from eqkernels.kernels.relative import relative_kernels
from eqkernels.pipelines.compare import CompareAdapter, CompareSizes, WidthSubset
from eqkernels.pipelines.compare_report import (curve_ends, errorbar_curve, format_value as _fmt,
                                                  markdown_table as _table, member_curve_tables, plot_width_study,
                                                  save_figure, sqrt_members_guide, timing_lines, width_study_line,
                                                  width_study_table)
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
class CompareConfig(CompareSizes):
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
        self.check_sizes(("size", "n_train", "n_test", "width", "gcnn_width", "members", "gcnn_members", "seeds",
                          "width_members", "width_n_train", "member_chunk"))
        try:
            ConvNetSpec().check_input_size(self.size)
        except ValueError as e:
            raise InputError(str(e)) from None

    @property
    def interpolated(self) -> bool:
        """True for groups acting by interpolation (every input is then disk-masked)."""
        return isinstance(resolve_group(self.group), RotationGroup)


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


def disk_masked(inputs: Inputs) -> Inputs:
    """The same inputs with every tile (and noise image) disk-masked, P_0 x: what C_n/D_n act on."""
    mask = lambda x: rotate(np.asarray(x, np.float32), 0.0)  # noqa: E731
    return replace(inputs, x_train=mask(inputs.x_train), sets={k: mask(v) for k, v in inputs.sets.items()})


# -------------------------------------------------------------------------------------------------- run

class HistologyComparison(CompareAdapter):
    """Tiles for the generic comparison (`eqkernels.pipelines.compare`): group orbits, CNN/GCNN ensembles."""

    plan_before_kernels = True                  # the calibration also measures the kernel pair rate
    member_fields = ("members", "gcnn_members")

    def load_inputs(self, config, data, ood):
        inputs = load_inputs(config, data, ood)
        return disk_masked(inputs) if config.interpolated else inputs

    def calibrate(self, config, inputs, kernels):
        from eqkernels.pipelines.histology_demo import measure_rate

        # η only scales the probe's learning rate; its cost does not depend on it.
        calibration = calibrate(config, inputs, 1e-3)
        rate = measure_rate(ConvNetSpec(), inputs.train.images, config.size)
        calibration["kernel_pairs_per_second"] = rate
        n_classes, n_eval = len(inputs.class_names), len(inputs.x_eval)
        estimate = lambda c: plan_seconds(c, n_classes, calibration["seconds_per_mac"], rate,  # noqa: E731
                                          calibration["compile_seconds"], n_eval)
        return estimate, calibration

    def members_note(self, config, fitted):
        return (f"members per ensemble reduced from {config.members} (CNN) / {config.gcnn_members} (GCNN) "
                f"to {fitted.members} / {fitted.gcnn_members}")

    def kernel_part(self, config, inputs, *, progress, log):
        return kernel_part(config, inputs, ConvNetSpec(), progress=progress)

    def kernel_log(self, config, kernels, seconds):
        return (f"kernels: {kernels['pairs']:,} pairs in {kernels['seconds']:.0f} s; η = {kernels['eta']:.3g} "
                f"(1/λ_max × {config.lr_scale:g})")

    def kernel_rows(self, config, inputs, kernels):
        return {f"kernel {name}": {"kind": "kernel", "label": f"{name} NTK (μ_k)",
                                   "values": measure(info["orbit_scores"], inputs),
                                   "accuracy_kernel_regression": info["accuracy_kernel_regression"]}
                for name, info in kernels["models"].items()}

    def after_kernels(self, config, inputs, kernels, progress):
        """The kernels' rotation sweep (kept in `kernels['sweep']`; the pools add their rows to it)."""
        from eqkernels.pipelines import histology_rotations as hr

        t0 = time.perf_counter()
        kernels["sweep"] = hr.start_sweep(kernels, inputs, ConvNetSpec(), resolve_group(config.group),
                                          progress=progress) if config.sweep else None
        return {"kernel sweep": time.perf_counter() - t0}

    def pool_specs(self, config, inputs, eta):
        return pool_specs(config, len(inputs.class_names), eta)

    def train_pool(self, spec, inputs, *, member_chunk, progress, description):
        return train(spec, inputs.x_train, inputs.y_train, member_chunk=member_chunk, progress=progress,
                     description=description)

    def member_outputs(self, config, ensemble, inputs):
        """(M, |G|, n_eval, C): every member's scores on the orbits of every evaluation input."""
        order, x_eval = resolve_group(config.group).order, inputs.x_eval
        scores = ensemble.outputs(orbit_inputs(x_eval, config.group))
        return scores.reshape(ensemble.members, order, len(x_eval), len(inputs.class_names))

    def reference(self, config, kernels, pool):
        return kernels["models"][matching_kernel(pool, config.group)]["orbit_scores"]

    def measure(self, outputs, inputs, reference=None):
        return measure(outputs, inputs, reference)

    def curve_metrics(self, inputs, reference):
        sl = inputs.slices()
        out = []
        for name, s in sl.items():
            out += [(f"invariance_error_{name}", lambda o, s=s: o[:, :, s], invariance_error),
                    (f"orbit_same_{name}", lambda o, s=s: o[:, :, s], orbit_same)]
        test = sl["test"]
        out.append(("distance_to_kernel_test", lambda o: o[:, 0, test],
                    lambda m, ref=reference[0, test]: metrics.relative_distance(m, ref)))
        return out

    def saved_ensemble(self, ensemble, members, inputs, pool):
        """The first repeat, as a file that `eqk histology predict` reads."""
        return HistologyEnsemble(ensemble.select(range(members)), inputs.preprocessing, inputs.class_names,
                                 inputs.train.fingerprints(), {"source": "eqk compare", "pool": pool})

    def after_pool(self, config, pool, ensemble, inputs, kernels):
        if kernels.get("sweep"):
            from eqkernels.pipelines import histology_rotations as hr

            kernels["sweep"]["rows"][f"ensemble {pool}"] = hr.ensemble_sweep(ensemble, inputs, seeds=config.seeds)

    def pool_log(self, config, row):
        v = row["values"]
        return (f"accuracy {v['accuracy'][0]:.3f}, orbit-same test {v['orbit_same_test'][0]:.2f}/"
                f"{resolve_group(config.group).order}")

    def width_subset(self, config, inputs, kernels):
        """A class-stratified subset of the training tiles (all of them if width_n_train covers them)."""
        labels = inputs.train.labels
        n_sub = min(config.width_n_train, len(inputs.x_train))
        idx = stratified_split(labels, n_sub, seed=config.split_seed)[0] if n_sub < len(labels) else np.arange(len(labels))
        test = inputs.slices()["test"]
        return WidthSubset(n_sub, inputs.x_train[idx], inputs.y_train[idx], kernels["plain_train_ntk"][np.ix_(idx, idx)],
                           kernels["plain_eval_ntk"][test][:, idx])

    def width_ensemble(self, config, width, eta, subset, progress):
        spec = EnsembleSpec(net=ConvNetSpec(channels=width), n_outputs=subset.y.shape[1], members=config.width_members,
                            steps=config.steps, learning_rate=eta, centred=True, batch_size=config.batch_size,
                            seed=100 + width)
        return train(spec, subset.train, subset.y, member_chunk=min(config.member_chunk, spec.members),
                     progress=progress, description=f"width {width}: training centred CNNs")

    def test_outputs(self, ensemble, inputs):
        return ensemble.outputs(inputs.sets["test"])

    def summary(self, config, inputs, kernels, parts):
        p = parts
        return {"config": config.to_dict(), "group": config.group, "group_order": resolve_group(config.group).order,
                "classes": inputs.class_names, "sets": inputs.descriptions,
                "eta": kernels["eta"], "lambda_max": kernels["lambda_max"], "kernel_pairs": kernels["pairs"],
                "identity_check": kernels["identity_check"], "rows": p["rows"], "curves": p["curves"],
                "pools": p["pools"], "sweep": kernels["sweep"], "interpolated": config.interpolated,
                "width_study": p["width_study"], "budget": p["budget"], "budget_note": p["budget_note"],
                "calibration": p["calibration"], "timings": p["timings"], "ensembles": p["ensembles"]}


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
    return out + width_study_line(summary["width_study"])


def _setup_lines(summary: dict) -> list[str]:
    """The '## Set-up' section: data, network, training, kernels, ensembles and the identity check."""
    c, group = summary["config"], summary["group"]
    kernels = GROUP_KERNELS[group]
    lines = []
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
    return lines


def markdown(summary: dict) -> str:
    c, order, group = summary["config"], summary["group_order"], summary["group"]
    kernels = GROUP_KERNELS[group]
    t = summary["timings"]
    lines = [f"# eqk compare: emergent equivariance on histology tiles ({group}, |G| = {order})", "",
             f"Run time **{t['total']:.0f} s** ({summary['budget_note']}).", ""]
    lines += _setup_lines(summary)
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
    sets = list(summary["sets"])
    second = sets[1] if len(sets) > 1 else "test"
    shown = (("invariance_error_test", "invariance error, test"),
             ("invariance_error_" + sets[-1], "invariance error, " + SET_TITLES.get(sets[-1], "")),
             ("orbit_same_" + second, "orbit-same, " + SET_TITLES.get(second, "")),
             ("distance_to_kernel_test", "‖mean − μ_k‖/‖μ_k‖, test"))
    lines += member_curve_tables(summary, shown)
    lines += ["Plots: `members.png`.", ""]
    w = summary["width_study"]
    lines += ["## Width study: centred networks approach μ_k", "",
              f"Centred CNNs f(x;θ) − f(x;θ₀) without augmentation, {w['members']} members per width, {w['n_train']} "
              f"training tiles, the same {c['steps']} steps at η = {w['eta']:.4g} (1/λ_max of their training kernel × "
              f"{c['lr_scale']:g}); distance to the plain NTK's μ_k on the held-out tiles. A plain (uncentred) "
              "ensemble's mean also carries its members' random initial functions, which average out only as "
              "1/√members and would hide the width; centring removes them exactly, so what is left is the "
              "finite-width effect.", ""]
    lines += width_study_table(w) + ["", "Plot: `width.png`.", ""]
    lines += timing_lines(t)
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
            errorbar_curve(axes[0], c, ls=styles.get(s, "-"), color=colours[pool],
                           label=f"{label}, {SET_TITLES.get(s, s)}")
        for s in sets[1:] or sets:
            errorbar_curve(axes[1], curve[f"orbit_same_{s}"], ls=styles.get(s, "-"), color=colours[pool],
                           label=f"{label}, {SET_TITLES.get(s, s)}")
        errorbar_curve(axes[2], curve["distance_to_kernel_test"], color=colours[pool], label=label)
    sqrt_members_guide(axes[0], summary["curves"]["cnn-aug"]["invariance_error_test"])
    axes[0].set(xscale="log", yscale="log", xlabel="members", ylabel="invariance error of the ensemble mean",
                title="invariance error")
    axes[1].set(xscale="log", xlabel="members", ylabel=f"orbit-same (of {summary['group_order']})",
                title="orbit-same-predictions, OOD inputs")
    axes[2].set(xscale="log", yscale="log", xlabel="members", ylabel="‖mean − μ_k‖/‖μ_k‖ (test)",
                title="distance to the kernel mean prediction")
    save_figure(fig, axes, out_dir / "members.png")

    plot_width_study(summary["width_study"], out_dir / "width.png", xlabel="width (channels)",
                     ylabel="‖f − μ_k‖/‖μ_k‖ (test)",
                     title="centred CNNs approach the NTK mean prediction")
    if summary.get("sweep"):
        from eqkernels.pipelines.histology_rotations import plot_sweep

        plot_sweep(summary["sweep"], {k: v["label"] for k, v in summary["rows"].items()}, out_dir / "rotation_sweep.png")


ADAPTER = HistologyComparison(headline_rows, markdown, plot)
run = ADAPTER.run                      # run(config, *, data, ood, budget, progress, log) → the summary
write_report = ADAPTER.write_report    # write_report(summary, out_dir) → the JSON record
