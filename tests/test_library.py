"""Library hygiene: importing eqkernels has no side effects, caches of compiled functions are bounded."""
import functools
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import eqkernels


def test_importing_eqkernels_sets_no_environment_variables():
    """In a fresh interpreter without TF_CPP_MIN_LOG_LEVEL (conftest sets it here): `import eqkernels` leaves
    the environment as it was, and so does importing every library module once its third-party dependencies
    are loaded (jax and TensorFlow set variables of their own on import; those are not ours to judge)."""
    code = ("import os, json, pkgutil, importlib; before = dict(os.environ); import eqkernels; "
            "changed = sorted(set(os.environ.items()) ^ set(before.items())); "
            "[importlib.import_module(m) for m in ('jax', 'neural_tangents', 'e3nn_jax', 'h5py', 'optax')]; "
            "before = dict(os.environ); "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(eqkernels.__path__, 'eqkernels.') "
            "if m.name.split('.')[1] not in ('apps', 'pipelines', 'datasets')]; "
            "print(json.dumps([changed, sorted(set(os.environ.items()) ^ set(before.items()))]))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]


def test_caches_of_compiled_functions_are_bounded():
    """Every functools.lru_cache in the library has a maxsize (an unbounded one keeps every jitted function
    of every architecture alive)."""
    caches = []
    for info in pkgutil.walk_packages(eqkernels.__path__, "eqkernels."):
        if info.name.split(".")[1] in ("apps", "pipelines", "datasets"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, functools._lru_cache_wrapper) and value.__module__ == module.__name__:
                caches.append((info.name, name, value.cache_parameters()["maxsize"]))
    assert len(caches) >= 10, caches
    assert [c for c in caches if c[2] is None] == []


DOCTEST_MODULES = ("eqkernels", "eqkernels.kernels", "eqkernels.solvers")


def test_examples_in_the_docstrings_run():
    """The runnable examples of the public entry points (a molecule kernel on two molecules in `eqkernels`,
    a kernel on two tiles in `ImageKernel`, a KRR fit in `eqkernels.solvers`) give what they print; each
    example asserts its own figures (invariance, shapes, fit error), so a wrong kernel fails here."""
    import doctest

    for name in DOCTEST_MODULES:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, (name, result)


def test_the_namespace_lists_what_it_offers():
    assert {"ImageKernel", "MoleculeKernel", "AtomKernelSpec", "dual_coefficients", "EnsembleSpec",
            "AtomMLPEnsembleSpec", "store", "get_group"} <= set(eqkernels.__all__)
    for name in eqkernels.__all__:
        assert getattr(eqkernels, name) is not None
    from eqkernels.kernels import ImageKernel

    assert eqkernels.ImageKernel is ImageKernel and eqkernels.store.save is importlib.import_module("eqkernels.store").save
