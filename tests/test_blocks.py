"""The block layer on Dask distributed (loopback LocalCluster): same matrices, dead workers, killed clients.

References are independent of the path under test: the in-process run (itself checked against
neural-tangents and explicit averages in test_engine / test_molecules_kernels) and the checkpoint
folder's own files (inode and mtime show whether a block was written again).
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from eqkernels import blocks
from eqkernels.blocks import Block, BlockError, DaskExecutor, run_blocks
from eqkernels.kernels import ConvNetSpec, relative_kernels
from eqkernels.molecule_kernel import AtomBatch, MoleculeKernel
from eqkernels.so3 import AtomKernelSpec
from tests.conftest import one_line_error as _one_line_error

NET = ConvNetSpec()


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes on 127.0.0.1; a task may lose one worker and is rerun, a second loss ends it."""
    with DaskExecutor(workers=2, allowed_failures=1) as executor:
        yield executor.start()


def _molecules(n: int, seed: int = 0) -> AtomBatch:
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 5)) < 0.7
    mask[2] = False  # a molecule without atoms must get a zero row
    return AtomBatch.from_padded(rng.standard_normal((n, 5, 4, 16)).astype(np.float32), mask)


def test_local_cluster_gives_the_in_process_matrices(cluster, rng):
    """Image (C4 relative kernels, with self terms) and molecule (mlp) kernels: float32 values
    made by the same compiled code on either side, so equality is exact."""
    # The symmetric image path is compared in the killed-worker test below.
    x, y = rng.standard_normal((7, 8, 8, 3)), rng.standard_normal((5, 8, 8, 3))
    for args in ((x, y),):
        local = relative_kernels(NET, *args, "C4", need_self=True, block_size=3, progress=False)
        remote = relative_kernels(NET, *args, "C4", need_self=True, block_size=3, progress=False, executor=cluster)
        for name in ("nngp", "ntk", "self1_ntk", "self2_nngp"):
            assert np.array_equal(getattr(local, name), getattr(remote, name)), name
        assert remote.stats["executor"].startswith("dask") and remote.stats["blocks"] > 10
    kernel = MoleculeKernel(AtomKernelSpec("mlp"), 3, tile=8, block_tiles=2, progress=False)
    a, b = _molecules(12), _molecules(6, seed=1)
    for other in (None, b):
        local = kernel.compute(a, other)
        remote = kernel.compute(a, other, executor=cluster)
        assert remote.stats.blocks > 2
        assert np.array_equal(local.ntk, remote.ntk) and np.array_equal(local.nngp, remote.nngp)


def test_killed_worker_the_run_finishes_and_no_checkpointed_block_is_recomputed(cluster, rng, tmp_path):
    x = rng.standard_normal((16, 12, 12, 3))
    reference = relative_kernels(NET, x, None, "C4", block_size=4, progress=False)
    folder, pids = tmp_path / "ck", list(cluster.client.run(os.getpid).values())
    seen: dict = {}

    def kill_once_blocks_exist():
        deadline = time.time() + 120
        while time.time() < deadline:
            files = list(folder.glob("*.h5")) if folder.exists() else []
            if len(files) >= 3:
                seen.update({f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files})
                os.kill(pids[0], signal.SIGKILL)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_once_blocks_exist)
    killer.start()
    rel = relative_kernels(NET, x, None, "C4", block_size=4, progress=False, checkpoint=folder, keep_checkpoint=True,
                           executor=cluster)
    killer.join()
    assert 3 <= len(seen) < rel.stats["blocks"], "the worker was not killed mid-run"
    assert np.array_equal(rel.ntk, reference.ntk) and np.array_equal(rel.nngp, reference.nngp)
    for name, identity in seen.items():  # a recomputed block would be a new file (os.replace)
        stat = (folder / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, name
    assert pids[0] not in cluster.client.run(os.getpid).values()


class _DyingBlocks:
    """Blocks that return constants, except block 'die', whose worker exits (as a crash would) once the
    other blocks are in `folder`."""

    names = ("nngp", "ntk")
    fingerprint = "test-dying-worker"

    def __init__(self, folder):
        self.folder = folder

    def compute(self, block, devices, advance):
        if block.key == "die":
            deadline = time.time() + 60
            while len(list(self.folder.glob("ok*.h5"))) < 3 and time.time() < deadline:
                time.sleep(0.01)
            os._exit(1)
        return {"nngp": np.full(2, 1.0), "ntk": np.full(2, 2.0)}


def test_worker_dying_on_every_attempt_is_one_error_naming_the_block(cluster, tmp_path):
    cluster.client.wait_for_workers(2, timeout=120)  # the previous test killed one
    # The finished blocks come from a first run of the same job: had they been submitted beside 'die',
    # one queued on the dying worker would count that worker's deaths too (distributed marks every task
    # processing on a lost worker suspicious), and the error could name it instead (seen in CI-like runs).
    ok = [Block(f"ok{k}", 2, ()) for k in range(3)]
    job, folder = _DyingBlocks(tmp_path / "ck"), tmp_path / "ck"
    run_blocks(job, ok, lambda b, a: None, checkpoint=folder, keep_checkpoint=True, executor=cluster, progress=False)
    stored = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.h5")}
    with pytest.raises(BlockError, match="kernel block die: its worker died on every attempt") as err:
        run_blocks(job, ok + [Block("die", 2, ())], lambda b, a: None, checkpoint=folder, executor=cluster,
                   progress=False)
    assert "\n" not in str(err.value)
    assert sorted(stored) == ["ok0.h5", "ok1.h5", "ok2.h5"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.h5")} == stored


def test_killed_client_rerun_resumes_the_molecule_kernel(tmp_path):
    """kill -9 of a process computing a checkpointed molecule kernel; the rerun reads its blocks back.

    The script slows each block by 0.3 s (harness only) so the kill lands mid-run."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
from eqkernels import molecule_kernel as mk
from tests.test_blocks import _molecules, _kernel
compute = mk._MoleculeBlocks.compute
mk._MoleculeBlocks.compute = lambda *a: (compute(*a), time.sleep(0.3))[0]
_kernel().compute(_molecules(24), checkpoint=sys.argv[1])
""")
    folder = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=dict(os.environ, EQK_PROGRESS="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(folder.glob("*.h5"))) < 4 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(folder.glob("*.h5")))
    resumed = _kernel().compute(_molecules(24), checkpoint=folder)
    assert resumed.stats.blocks_resumed == finished > 0 and resumed.stats.blocks > finished
    fresh = _kernel().compute(_molecules(24))
    assert np.array_equal(resumed.ntk, fresh.ntk) and np.array_equal(resumed.nngp, fresh.nngp)
    assert not folder.exists()


def _kernel() -> MoleculeKernel:
    return MoleculeKernel(AtomKernelSpec("mlp"), 3, tile=8, block_tiles=1, progress=False)


def test_two_simulated_devices_per_worker_under_dask(tmp_path, rng):
    """A LocalCluster worker started with two host devices spreads each block's chunks over both."""
    script = tmp_path / "two.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
import jax, numpy as np
from eqkernels.blocks import DaskExecutor
from eqkernels.kernels import ConvNetSpec, relative_kernels
if __name__ == "__main__":
    x = np.load(sys.argv[1])
    with DaskExecutor(workers=1) as ex:
        ex.start()
        devices = list(ex.client.run(lambda: len(jax.local_devices())).values())
        ntk = relative_kernels(ConvNetSpec(), x, None, "C4", progress=False, chunk=4, block_size=3, executor=ex).ntk
    np.savez(sys.argv[2], ntk=ntk, devices=devices)
""")
    x = rng.standard_normal((6, 8, 8, 3))
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", EQK_PROGRESS="0")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), str(tmp_path / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    assert list(out["devices"]) == [2]
    one = relative_kernels(NET, x, None, "C4", progress=False, chunk=4, block_size=3).ntk
    assert np.allclose(out["ntk"], one, rtol=1e-6, atol=0)  # as test_relative's two-device check


# ---------------------------------------------------------------------------------------- bad input, CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_cluster_options_through_the_cli(cli, tmp_path, pathmnist):
    from eqkernels.datasets import PATHMNIST_SAMPLE

    base = ["kernel", "cnn", PATHMNIST_SAMPLE, "--size", "8", "--limit", "6", "--out", tmp_path / "k.h5"]
    _one_line_error(cli(*base, "--cluster", "local:zero"), "--cluster must be local or local:WORKERS")
    _one_line_error(cli(*base, "--cluster", "local", "--scheduler", "tcp://127.0.0.1:1"), "not both")
    _one_line_error(cli(*base, "--scheduler", f"tcp://127.0.0.1:{_free_port()}"), "cannot reach the Dask scheduler")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "checkpoint.json").write_text(json.dumps({"format": blocks.CHECKPOINT_FORMAT, "fingerprint": "other"}))
    _one_line_error(cli(*base, "--checkpoint", ck, "--cluster", "local:1"), "belongs to other inputs")
    assert not (tmp_path / "k.h5").exists()


def test_full_disk_is_one_line_and_keeps_the_finished_blocks(cli, tmp_path, monkeypatch):
    from eqkernels.datasets import PATHMNIST_SAMPLE

    real, writes = h5py.File, []

    def filling_up(path, mode="r", *args, **kwargs):
        if mode == "w":
            writes.append(path)
            if len(writes) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(blocks.h5py, "File", filling_up)
    ck = tmp_path / "ck"
    result = cli("kernel", "cnn", PATHMNIST_SAMPLE, "--size", "8", "--limit", "6", "--block-size", "2",
                 "--checkpoint", ck, "--out", tmp_path / "k.h5")
    _one_line_error(result, "no space left on the device writing kernel block")
    assert len(list(ck.glob("*.h5"))) == 2 and not list(ck.glob(".*tmp*"))
    assert not (tmp_path / "k.h5").exists()
