"""eqkernels: equivariant neural tangent kernels for histology tiles and molecules.

The library lives in `eqkernels` (groups, layers, kernels, solvers, ensembles,
metrics, model store); domain pipelines in `eqkernels.pipelines`, the `eqk`
command line in `eqkernels.apps` and the bundled sample data in
`eqkernels.datasets`.
"""
import os as _os

# TensorFlow (pulled in by neural-tangents) is chatty on import; keep the CLI quiet.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from eqkernels._version import __version__  # noqa: E402

__all__ = ["__version__"]
