"""Kernel models for histology tiles: train, save, load, predict.

A model file (HDF5, see `eqkernels.store`) holds everything prediction needs and nothing
executable: the preprocessed training tiles, the dual coefficients of the NTK mean prediction,
the Cholesky factor for NNGP posterior variances, the kernel specification, the preprocessing,
class names, options and library versions.
"""
from __future__ import annotations

import json
import time as _time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels import store
from eqkernels.errors import InputError, ModelFileError
from eqkernels.groups import resolve_group, rotate
from eqkernels.kernels import ImageKernel, KernelSpec
from eqkernels.kernels.families import family_diagonal, family_kernels, left_translate
from eqkernels.kernels.relative import RelativeKernels, group_relative_kernels
from eqkernels.solvers import GaussianPosterior, centred_one_hot, dual_coefficients, mean_prediction
from eqkernels.nystrom import plan_solver
from eqkernels.pipelines.histology import Preprocessing, TileSet
from eqkernels.pipelines.histology_nystrom import STORED_KERNELS, fit_nystrom

MODEL_KIND = "histology-model"
MODEL_SCHEMA = 1  # bump when the meaning of stored fields changes


@dataclass
class Prediction:
    """Scores (M, C) of the NTK mean prediction, predicted classes (M,), NNGP posterior variance (M,)."""

    scores: np.ndarray
    classes: np.ndarray
    variance: np.ndarray | None = None


@dataclass
class HistologyModel:
    spec: KernelSpec
    preprocessing: Preprocessing
    class_names: list[str]
    train_inputs: np.ndarray          # (N, S, S, 3) float32, preprocessed
    train_labels: np.ndarray          # (N,)
    train_fingerprints: np.ndarray    # (N,) S16: which raw tiles were used for training
    dual_coef: np.ndarray             # (N, C): scores = Θ(x, X) @ dual_coef
    posterior_cholesky: np.ndarray    # (N, N): NNGP posterior variance
    options: dict = field(default_factory=dict)
    # Nyström models (eqkernels.nystrom): train_inputs are the M inducing tiles, dual_coef (M, C),
    # posterior_cholesky and posterior_system the DTC variance factors (M, M); None: exact model.
    posterior_system: np.ndarray | None = None

    def posterior(self):
        """The NNGP posterior-variance factor: exact (GaussianPosterior) or DTC (NystromPosterior)."""
        if self.posterior_system is None:
            return GaussianPosterior(self.posterior_cholesky)
        from eqkernels.nystrom import NystromPosterior

        return NystromPosterior(self.posterior_cholesky, self.posterior_system,
                                float(self.options["solver"]["posterior_reg"]))

    # ------------------------------------------------------------------------------ kernels, predictions
    def kernel(self, progress: bool | None = True) -> ImageKernel:
        return ImageKernel(self.spec, progress=progress)

    def relative(self, inputs: np.ndarray, group: str | None = None, *, progress: bool | None = True,
                 checkpoint: str | Path | None = None, description: str = "test × train kernel") -> RelativeKernels:
        """Relative pooled kernels between preprocessed `inputs` and the training tiles, with self terms.

        `group`: an exact grid group containing the family's (C4 for a C4 family, D4 …); an
        interpolated family (C8, C16, …) always uses its own group (stacked inputs).
        """
        group = resolve_group(self.spec.group if self.spec.interpolated else (group or self.spec.group))
        # Self terms of the test tiles serve the posterior variance; the training tiles' are only
        # needed by a nonlinear readout.
        return group_relative_kernels(self.spec.net, inputs, self.train_inputs, group, need_self=True,
                                      need_self2=self.spec.net.readout != "linear", checkpoint=checkpoint,
                                      progress=progress, description=description)

    def predict_from_relative(self, rel: RelativeKernels, element: int = 0) -> Prediction:
        """Prediction for g·x where g is element number `element` of `rel`'s group (0: x itself)."""
        if element:
            rel = left_translate(rel, element)
        kernels = family_kernels(self.spec, rel)
        scores = mean_prediction(kernels["ntk"], self.dual_coef)
        diag = family_diagonal(self.spec, rel)["nngp"]
        variance = self.posterior().variance(diag, kernels["nngp"])
        return Prediction(scores, np.argmax(scores, axis=1), variance)

    def predict(self, images: np.ndarray, *, progress: bool | None = True) -> Prediction:
        """Predict raw RGB tiles (M, h, w, 3) uint8 (resized and standardised like the training tiles)."""
        return self.predict_from_relative(self.relative(self.preprocessing(images), progress=progress))

    # ----------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        meta = {"kernel": json.loads(self.spec.to_json()),
                "preprocessing": self.preprocessing.to_dict(), "class_names": list(self.class_names),
                "options": self.options}
        arrays = {"train_inputs": self.train_inputs.astype(np.float32), "train_labels": self.train_labels,
                  "train_fingerprints": self.train_fingerprints, "dual_coef": self.dual_coef,
                  "posterior_cholesky": self.posterior_cholesky}
        if self.posterior_system is not None:
            arrays["posterior_system"] = self.posterior_system
        return store.save(path, MODEL_KIND, meta, arrays, version=MODEL_SCHEMA)

    @classmethod
    def load(cls, path: str | Path, expected_kernel: str | None = None) -> "HistologyModel":
        meta, arrays = store.load(path, MODEL_KIND)
        store.check_version(meta, MODEL_SCHEMA, path, label="histology model")
        try:
            spec = KernelSpec.from_dict(meta["kernel"])
            model = cls(spec=spec, preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
                        class_names=list(meta["class_names"]), train_inputs=arrays["train_inputs"],
                        train_labels=arrays["train_labels"], train_fingerprints=arrays["train_fingerprints"],
                        dual_coef=arrays["dual_coef"], posterior_cholesky=arrays["posterior_cholesky"],
                        options=dict(meta.get("options", {})), posterior_system=arrays.get("posterior_system"))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"model file lacks or garbles a field ({type(e).__name__}: {e})", path) from None
        if expected_kernel is not None and spec.name != expected_kernel:
            raise ModelFileError(f"model was trained with kernel {spec.name!r}, not {expected_kernel!r}", path)
        n = len(model.train_inputs)
        if (model.dual_coef.shape != (n, len(model.class_names)) or model.posterior_cholesky.shape != (n, n)
                or (model.posterior_system is not None and model.posterior_system.shape != (n, n))):
            raise ModelFileError("inconsistent array shapes in model file", path)
        return model


def fit_from_kernels(spec: KernelSpec, preprocessing: Preprocessing, train: TileSet, train_inputs: np.ndarray,
                     kernels: dict[str, np.ndarray], *, ridge: float, time: float | None, learning_rate: float,
                     options: dict) -> HistologyModel:
    """Solve for the dual coefficients from train×train kernels {'nngp','ntk'} (N, N)."""
    y = centred_one_hot(train.labels, len(train.class_names))
    alpha = dual_coefficients(kernels["ntk"], y, ridge=ridge, time=time, learning_rate=learning_rate)
    posterior = GaussianPosterior.fit(kernels["nngp"], ridge=ridge)
    chol = posterior.cholesky
    opts = dict(options, ridge=ridge, time=None if time is None else float(time), learning_rate=learning_rate,
                posterior_ridge=posterior.ridge)
    return HistologyModel(spec, preprocessing, list(train.class_names), train_inputs.astype(np.float32),
                          np.asarray(train.labels), train.fingerprints(), alpha, chol, opts)


def train_model(spec: KernelSpec, train: TileSet, *, size: int, ridge: float = 1e-6, time: float | None = None,
                learning_rate: float = 1.0, checkpoint: str | Path | None = None, progress: bool | None = True,
                options: dict | None = None, inducing: str | int | None = None,
                executor=None) -> tuple[HistologyModel, dict]:
    """Fit preprocessing and the kernel model on `train`; returns (model, timings in seconds).

    `inducing` ('auto', 'exact' or M; None: exact, no choice recorded): see `eqkernels.nystrom.plan_solver`.
    `executor`: where the kernel blocks run (None: in-process; see `eqkernels.blocks`).
    """
    if len(set(train.labels.tolist())) < 2:
        raise InputError("training data must contain at least two classes")
    spec.net.check_input_size(size)
    if spec.interpolated:
        try:
            resolve_group(spec.group).check_size(size)
        except ValueError as e:
            raise InputError(str(e)) from None
    t0 = _time.perf_counter()
    preprocessing = Preprocessing.fit(train.images, size)
    inputs = preprocessing(train.images)
    t1 = _time.perf_counter()
    plan = None if inducing is None else plan_solver(len(inputs), inducing, stored_kernels=STORED_KERNELS)
    if plan is not None and plan["solver"] == "nystrom":
        model, timings = fit_nystrom(spec, preprocessing, train, inputs, plan, ridge=ridge, time=time,
                                     seed=int((options or {}).get("seed", 0)), checkpoint=checkpoint,
                                     progress=progress, options=options, executor=executor)
    else:
        kernels = ImageKernel(spec, progress=progress)(inputs, checkpoint=checkpoint,
                                                       description="train × train kernel", executor=executor)
        t2 = _time.perf_counter()
        model = fit_from_kernels(spec, preprocessing, train, inputs, kernels, ridge=ridge, time=time,
                                 learning_rate=learning_rate, options=dict(options or {}, **({"solver": plan} if plan else {})))
        timings = {"kernel_s": t2 - t1, "solve_s": _time.perf_counter() - t2}
    t3 = _time.perf_counter()
    if spec.interpolated:
        model.options["invariance_error"] = kernel_invariance_error(spec, inputs, progress=progress)
    return model, {"preprocess_s": t1 - t0, **timings, "invariance_check_s": _time.perf_counter() - t3}


def kernel_invariance_error(spec: KernelSpec, inputs: np.ndarray, *, probes: int = 4, references: int = 32,
                            progress: bool | None = None) -> dict:
    """Measured invariance error of an interpolated family's NTK under its off-grid rotations.

    For each fine angle a ≠ 0: max |Θ_G(P_a x, y) − Θ_G(x, y)| / max |Θ_G(x, y)| over `probes` tiles x
    and `references` tiles y of `inputs` (the grid rotations are exact and not measured). The
    double average is exact; this is what the interpolation's composition defect leaves.
    """
    group = resolve_group(spec.group)
    x, y = inputs[:probes], inputs[:references]
    kernel = ImageKernel(spec, progress=progress)
    base = kernel(x, y, get="ntk")
    out = {}
    for angle in group.fine_angles[1:]:
        moved = kernel(rotate(x, angle), y, get="ntk")
        out[f"{angle:g}"] = float(np.max(np.abs(moved - base)) / max(np.max(np.abs(base)), 1e-300))
    return {"measure": "max |K(P_a x, y) − K(x, y)| / max |K(x, y)| (NTK)", "probes": int(len(x)),
            "references": int(len(y)), "by_angle": out, "max": max(out.values()) if out else 0.0}
