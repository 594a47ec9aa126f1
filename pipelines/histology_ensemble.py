"""Deep ensembles for histology tiles: train, save, load, predict (the finite-width twin of a kernel model).

An ensemble file (kind "ensemble", see `eqkernels.ensembles` and `eqkernels.store`) holds the
members' parameters under their tree paths, the ensemble specification, the preprocessing, the
class names and the fingerprints of the training tiles; nothing executable. Predictions are the
mean of the members' outputs (scores of centred one-hot targets, as for kernel models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels.ensembles import Ensemble, EnsembleSpec, train
from eqkernels.errors import InputError, ModelFileError
from eqkernels.pipelines.histology import Preprocessing, TileSet
from eqkernels.solvers import centred_one_hot

TASK = "histology"


@dataclass
class EnsemblePrediction:
    """Mean scores (M, C), predicted classes (M,), and the members' spread of the winning score (M,)."""

    scores: np.ndarray
    classes: np.ndarray
    member_std: np.ndarray


@dataclass
class HistologyEnsemble:
    ensemble: Ensemble
    preprocessing: Preprocessing
    class_names: list[str]
    train_fingerprints: np.ndarray    # (N,) S16: which raw tiles were used for training
    options: dict = field(default_factory=dict)

    @property
    def spec(self) -> EnsembleSpec:
        return self.ensemble.spec

    def predict_inputs(self, inputs: np.ndarray) -> EnsemblePrediction:
        """Predict preprocessed tiles (M, S, S, 3)."""
        outputs = self.ensemble.outputs(inputs)
        scores = outputs.mean(axis=0)
        classes = np.argmax(scores, axis=1)
        spread = outputs[:, np.arange(len(classes)), classes].std(axis=0)
        return EnsemblePrediction(scores, classes, spread)

    def predict(self, images: np.ndarray) -> EnsemblePrediction:
        """Predict raw RGB tiles (M, h, w, 3) uint8 (resized and standardised like the training tiles)."""
        return self.predict_inputs(self.preprocessing(images))

    def save(self, path: str | Path) -> Path:
        meta = {"task": TASK, "preprocessing": self.preprocessing.to_dict(), "class_names": list(self.class_names),
                "options": self.options}
        return self.ensemble.save(path, meta, {"train_fingerprints": self.train_fingerprints})

    @classmethod
    def load(cls, path: str | Path) -> "HistologyEnsemble":
        ensemble, meta, arrays = Ensemble.load(path)
        if meta.get("task") != TASK:
            raise ModelFileError(f"ensemble was trained for task {meta.get('task')!r}, not {TASK!r}", path)
        try:
            out = cls(ensemble, Preprocessing.from_dict(meta["preprocessing"]), list(meta["class_names"]),
                      arrays["train_fingerprints"], dict(meta.get("options", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"ensemble file lacks or garbles a field ({type(e).__name__}: {e})", path) from None
        if ensemble.spec.n_outputs != len(out.class_names):
            raise ModelFileError(f"ensemble has {ensemble.spec.n_outputs} outputs for {len(out.class_names)} classes",
                                 path)
        if tuple(ensemble.input_shape) != (out.preprocessing.size, out.preprocessing.size, 3):
            raise ModelFileError(f"ensemble input shape {ensemble.input_shape} does not match the "
                                 f"preprocessing ({out.preprocessing.size} px RGB)", path)
        return out


def train_histology_ensemble(spec: EnsembleSpec, train_tiles: TileSet, *, size: int,
                             preprocessing: Preprocessing | None = None, progress: bool | None = True,
                             options: dict | None = None) -> HistologyEnsemble:
    """Fit the preprocessing (unless given) and train the ensemble on centred one-hot targets."""
    if len(set(train_tiles.labels.tolist())) < 2:
        raise InputError("training data must contain at least two classes")
    n_classes = len(train_tiles.class_names)
    if spec.n_outputs != n_classes:
        raise ValueError(f"the ensemble has {spec.n_outputs} outputs for {n_classes} classes")
    try:
        spec.net.check_input_size(size)
    except ValueError as e:
        raise InputError(str(e)) from None
    preprocessing = preprocessing or Preprocessing.fit(train_tiles.images, size)
    inputs = preprocessing(train_tiles.images)
    ensemble = train(spec, inputs, centred_one_hot(train_tiles.labels, n_classes), progress=progress)
    return HistologyEnsemble(ensemble, preprocessing, list(train_tiles.class_names), train_tiles.fingerprints(),
                             dict(options or {}))
