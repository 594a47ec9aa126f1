"""Shared fixtures: small real tiles, seeded random images, and a CLI runner."""
from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("EQK_PROGRESS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def pathmnist():
    from eqkernels.datasets import PATHMNIST_SAMPLE
    from eqkernels.pipelines.histology import load_tiles

    return load_tiles(PATHMNIST_SAMPLE)


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, err={self.err!r}, out={self.out[-500:]!r})"


def one_line_error(result: CliResult, *words: str) -> None:
    """Assert a refused command: exit code 2, one line on stderr, no traceback, naming every one of `words`."""
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def cli():
    """Run `eqk ARGS...` in-process; returns exit code, stdout and stderr."""
    from eqkernels.apps.cli import main

    def run(*args):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
        return CliResult(code, out.getvalue(), err.getvalue())

    return run
