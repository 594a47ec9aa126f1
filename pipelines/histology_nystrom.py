"""Histology kernel models on many tiles: Nyström-preconditioned CG (`eqkernels.nystrom`) in place of exact KRR.

The N×M kernels (NNGP and NTK) between the training tiles and M inducing tiles (uniform among the
training tiles, seeded by the split seed) are computed in row blocks by the same engine as the
exact kernels; K_MM is their rows at the inducing tiles. The model then stores the inducing tiles
as its `train_inputs` (predictions are K(x, Z) β), the coefficients β (M, C), the DTC variance
factors, and the solver's choice, reason, CG iterations and residual in `options['solver']`.
Only t = ∞ (kernel ridge regression) is offered: the gradient-flow mean μ_t stays exact.
"""
from __future__ import annotations

import time as _time
from pathlib import Path

import numpy as np

from eqkernels.errors import InputError
from eqkernels.kernels import ImageKernel, KernelSpec
from eqkernels.nystrom import NystromPosterior, falkon_solve, row_blocks, uniform_inducing
from eqkernels.solvers import centred_one_hot

STORED_KERNELS = 3  # the exact fit holds the NNGP and NTK N×N kernels and one N×N Cholesky factor


def inducing_kernels(spec: KernelSpec, inputs: np.ndarray, idx: np.ndarray, *, checkpoint: str | Path | None = None,
                     progress: bool | None = True, block: int = 512, executor=None) -> dict[str, np.ndarray]:
    """{'nngp', 'ntk'} (N, M) between preprocessed tiles (N, S, S, 3) and the inducing tiles inputs[idx].

    With `checkpoint`, each row block keeps its own resumable sub-folder (rows_<start>) there;
    `executor`: where the kernel blocks run (None: in-process; see `eqkernels.blocks`).
    """
    kernel = ImageKernel(spec, progress=progress)
    inducing = inputs[idx]

    def cross(start, stop):
        folder = None if checkpoint is None else Path(checkpoint) / f"rows_{start}"
        return kernel(inputs[start:stop], inducing, checkpoint=folder, executor=executor,
                      description=f"train × inducing kernel, rows {start}–{stop} of {len(inputs)}")

    return row_blocks(cross, len(inputs), block)


def fit_nystrom(spec: KernelSpec, preprocessing, train, inputs: np.ndarray, plan: dict, *, ridge: float,
                time: float | None, seed: int = 0, checkpoint: str | Path | None = None,
                progress: bool | None = True, options: dict | None = None, executor=None):
    """(HistologyModel, timings) by Nyström-CG with plan['inducing'] inducing tiles (see the module docstring)."""
    from eqkernels.pipelines.histology_model import HistologyModel

    if time is not None:
        raise InputError("--inducing (the Nyström solver) gives kernel ridge regression only; use --time inf "
                         "or --inducing exact")
    if not ridge > 0:
        raise InputError(f"the Nyström solver needs a positive --ridge, got {ridge}")
    t0 = _time.perf_counter()
    idx = uniform_inducing(len(inputs), int(plan["inducing"]), seed)
    k = inducing_kernels(spec, inputs, idx, checkpoint=checkpoint, progress=progress, executor=executor)
    t1 = _time.perf_counter()
    y = centred_one_hot(train.labels, len(train.class_names))
    solution = falkon_solve(k["ntk"], k["ntk"][idx], y, ridge=ridge)
    posterior = NystromPosterior.fit(k["nngp"], k["nngp"][idx], ridge=ridge)
    t2 = _time.perf_counter()
    solver = dict(plan, rule="uniform", seed=int(seed), **solution.info(), posterior="DTC",
                  posterior_reg=posterior.reg, posterior_jitter=posterior.jitter)
    opts = dict(options or {}, ridge=ridge, time=None, learning_rate=1.0, posterior_ridge=ridge, solver=solver)
    model = HistologyModel(spec, preprocessing, list(train.class_names), inputs[idx].astype(np.float32),
                           np.asarray(train.labels), train.fingerprints(), solution.coef, posterior.cholesky, opts,
                           posterior_system=posterior.system)
    return model, {"kernel_s": t1 - t0, "solve_s": t2 - t1}

