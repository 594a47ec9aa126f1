"""Blocked relative kernels: symmetry bookkeeping, checkpoints, resuming after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eqkernels.errors import InputError
from eqkernels.kernels import ConvNetSpec, relative_kernels
from eqkernels.kernels import engine


def test_symmetric_path_equals_cross_path(rng):
    x = rng.standard_normal((7, 8, 8, 3))
    for group in ("C4", "D4"):
        sym = relative_kernels(ConvNetSpec(), x, None, group, need_self=True, block_size=3, progress=False)
        cross = relative_kernels(ConvNetSpec(), x, x, group, need_self=True, block_size=3, progress=False)
        assert np.max(np.abs(sym.ntk - cross.ntk)) / np.max(np.abs(cross.ntk)) < 1e-5
        assert np.max(np.abs(sym.self1_nngp - cross.self1_nngp)) / np.max(cross.self1_nngp) < 1e-5
        assert not np.any(np.isnan(sym.ntk))
        # Each unordered value is computed once: fewer pairs than the full |G|·N² of the cross path.
        assert sym.stats["pairs"] < 0.6 * cross.stats["pairs"]


def test_checkpoint_resumes_without_recomputing(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((9, 8, 8, 3))
    reference = relative_kernels(ConvNetSpec(), x, None, "C4", block_size=3, progress=False)
    calls = {"n": 0}
    original = engine.PairEvaluator.dispatch

    def failing(self, i, j):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return original(self, i, j)

    monkeypatch.setattr(engine.PairEvaluator, "dispatch", failing)
    with pytest.raises(KeyboardInterrupt):
        relative_kernels(ConvNetSpec(), x, None, "C4", block_size=3, progress=False, checkpoint=tmp_path / "ck",
                         chunk=8)
    saved = list((tmp_path / "ck").glob("*.h5"))
    assert 0 < len(saved)
    monkeypatch.setattr(engine.PairEvaluator, "dispatch", original)
    resumed = relative_kernels(ConvNetSpec(), x, None, "C4", block_size=3, progress=False, checkpoint=tmp_path / "ck",
                               chunk=8)
    assert resumed.stats["blocks_resumed"] == len(saved)
    assert resumed.stats["pairs_computed"] < resumed.stats["pairs"]
    assert np.allclose(resumed.ntk, reference.ntk, rtol=1e-6, atol=0)
    assert not (tmp_path / "ck").exists()  # removed after success by default


def test_checkpoint_of_other_inputs_is_refused(tmp_path, rng):
    x = rng.standard_normal((4, 8, 8, 3))
    relative_kernels(ConvNetSpec(), x, None, "C4", progress=False, checkpoint=tmp_path / "ck", keep_checkpoint=True)
    with pytest.raises(InputError, match="other inputs"):
        relative_kernels(ConvNetSpec(), x + 1, None, "C4", progress=False, checkpoint=tmp_path / "ck")


def test_kill_dash_nine_then_rerun_gives_the_same_matrix(tmp_path):
    """`eqk kernel` killed with SIGKILL mid-run resumes from its finished blocks."""
    from eqkernels.datasets import PATHMNIST_SAMPLE

    env = dict(os.environ, EQK_PROGRESS="0", TF_CPP_MIN_LOG_LEVEL="3")
    base = [sys.executable, "-m", "eqkernels.apps.cli", "kernel", "cnn-c4avg", str(PATHMNIST_SAMPLE),
            "--size", "12", "--limit", "24", "--block-size", "4"]
    ck = tmp_path / "ck"
    proc = subprocess.Popen(base + ["--out", str(tmp_path / "a.h5"), "--checkpoint", str(ck)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(ck.glob("*.h5"))) < 8 and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the job larger")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(ck.glob("*.h5")))
    assert finished >= 8 and not (tmp_path / "a.h5").exists()
    rerun = subprocess.run(base + ["--out", str(tmp_path / "a.h5"), "--checkpoint", str(ck)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed {finished} of" in rerun.stdout
    fresh = subprocess.run(base + ["--out", str(tmp_path / "b.h5")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    from eqkernels import store

    _, a = store.load(tmp_path / "a.h5", "kernel")
    _, b = store.load(tmp_path / "b.h5", "kernel")
    assert np.allclose(a["ntk"], b["ntk"], rtol=1e-6, atol=0)
    assert not ck.exists()


def test_blocks_spread_over_several_devices_give_the_same_matrix(tmp_path):
    """Two (simulated) host devices: chunks alternate between them; the result must not change."""
    script = """
import numpy as np, jax
from eqkernels.kernels import ConvNetSpec, relative_kernels
assert len(jax.local_devices()) == 2
x = np.random.default_rng(0).standard_normal((6, 8, 8, 3))
r = relative_kernels(ConvNetSpec(), x, None, "C4", progress=False, chunk=4, block_size=3)
np.save(%r, r.ntk)
""" % str(tmp_path / "two.npy")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    x = np.random.default_rng(0).standard_normal((6, 8, 8, 3))
    one = relative_kernels(ConvNetSpec(), x, None, "C4", progress=False, chunk=4, block_size=3).ntk
    assert np.allclose(np.load(tmp_path / "two.npy"), one, rtol=1e-6, atol=0)


def test_memory_budget_too_small_for_one_pair_is_refused(rng):
    with pytest.raises(InputError, match="memory budget"):
        relative_kernels(ConvNetSpec(), rng.standard_normal((2, 28, 28, 3)), None, "C1", memory_budget_mb=1,
                         progress=False)
