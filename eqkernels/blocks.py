"""One block layer for every kernel matrix: plan, checkpoint, progress, devices, and where blocks run.

A kernel matrix is cut into blocks. A `Block` has a `key` (unique within its job; with the job's
content fingerprint it names the block's HDF5 file and its Dask task), the `work` it represents
(pairs, for the progress bar) and a small picklable `where` saying which part of the matrix it is.
A `BlockJob` is what a kernel family supplies: its `fingerprint` (hash of inputs, network and
format), the `names` of a block's arrays, and `compute(block, devices, advance) -> {name: array}`,
which prepares what it needs once per process (per-side features, cached on the job: the
`prepare` step) and evaluates the block's pairs (the `pair` step). The layer:

- skips blocks already in the checkpoint folder (`BlockStore`: one HDF5 file per block, written
  atomically; the folder, on a shared filesystem for a cluster, is the durable state);
- runs the rest in-process (`compute` spreads its chunks round-robin over the local JAX devices
  with `round_robin`) or on Dask distributed (`DaskExecutor`: each block a task, written into the
  folder by the worker, gathered with `as_completed`);
- advances one progress bar (rate, ETA) and returns `BlockStats`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import h5py
import numpy as np

from eqkernels.errors import InputError
from eqkernels.progress import Meter
from eqkernels.store import atomic_write_text

CHECKPOINT_FORMAT = "eqkernels-kernel-blocks"
CHECKPOINT_VERSION = 1


class BlockError(InputError):
    """A block that cannot be computed or stored (dead workers, full disk, unreachable scheduler)."""


@dataclass(frozen=True)
class Block:
    """One task: `key` (file stem, unique in its job), `work` (pairs), `where` (job-specific, picklable)."""

    key: str
    work: int
    where: tuple


@dataclass
class BlockStats:
    """What one run did: blocks planned / resumed from the checkpoint, pairs, seconds, where it ran."""

    blocks: int = 0
    blocks_resumed: int = 0
    pairs: int = 0
    pairs_computed: int = 0
    seconds: float = 0.0
    executor: str = "in-process"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


class BlockJob(Protocol):
    """What a kernel supplies to the block layer (picklable: Dask sends it to the workers)."""

    fingerprint: str
    names: tuple[str, ...]  # the arrays of a block, e.g. ('nngp', 'ntk')

    def compute(self, block: Block, devices: list, advance: Callable[[int], None]) -> dict[str, np.ndarray]:
        """The block's arrays; calls `advance(pairs)` as chunks finish (in-process progress)."""


def fingerprint(meta: dict, arrays: Iterable[np.ndarray | None]) -> str:
    """sha256 of the JSON `meta` (plus the checkpoint format version) and the arrays' shapes and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({**meta, "format": CHECKPOINT_VERSION}, sort_keys=True, default=str).encode())
    for x in arrays:
        if x is None:
            h.update(b"symmetric")
        else:
            h.update(str(x.shape).encode())
            h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


class BlockStore:
    """A checkpoint folder with one HDF5 file per finished block (`folder=None`: nothing is stored)."""

    def __init__(self, folder: str | Path | None, fingerprint: str, *, create: bool = True):
        self.folder = None if folder is None else Path(folder)
        if self.folder is None or not create:
            return
        meta_path = self.folder / "checkpoint.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"unreadable checkpoint metadata ({e})", meta_path) from None
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
                raise InputError("checkpoint folder belongs to other inputs or another kernel; "
                                 "remove it or choose another --checkpoint", self.folder)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta_path, json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                                      "fingerprint": fingerprint}))

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.h5"

    def load(self, key: str, names: tuple[str, ...] = ("nngp", "ntk")) -> dict[str, np.ndarray] | None:
        """The stored arrays of block `key`, or None (absent or damaged: it is simply computed again)."""
        if self.folder is None or not self._path(key).exists():
            return None
        try:
            with h5py.File(self._path(key), "r") as f:
                return {name: f[name][()] for name in names}
        except (OSError, KeyError):
            return None

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Write block `key` atomically; a full disk is one BlockError (finished blocks stay)."""
        if self.folder is None:
            return
        tmp = self.folder / f".{key}.h5.tmp{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                for name, value in arrays.items():
                    f[name] = value
            os.replace(tmp, self._path(key))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
                raise BlockError(f"no space left on the device writing kernel block {key}; the finished "
                                 "blocks are kept, free space and rerun to resume", self.folder) from None
            raise

    def remove(self) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


def round_robin(chunks: list, devices: list, dispatch: Callable, depth: int | None = None) -> Iterator[tuple]:
    """Yield (chunk, outputs) in order; chunk k is dispatched (asynchronously) on devices[k % n].

    At most `depth` (default: one per device) chunks are in flight, so every device stays busy while
    the host collects results, and memory stays bounded.
    """
    import jax

    depth = max(depth or len(devices), 1)
    queue: deque = deque()
    for k, chunk in enumerate(chunks):
        queue.append((chunk, dispatch(chunk, devices[k % len(devices)])))
        if len(queue) >= depth:
            done = queue.popleft()
            yield done[0], jax.block_until_ready(done[1])
    while queue:
        done = queue.popleft()
        yield done[0], jax.block_until_ready(done[1])


class InProcess:
    """Blocks one after another in this process, chunks round-robin over the local JAX devices."""

    name = "in-process"

    def map(self, job: BlockJob, blocks: list[Block], store: BlockStore, advance) -> Iterator[tuple[Block, dict]]:
        import jax

        devices = jax.local_devices()
        for block in blocks:
            arrays = job.compute(block, devices, advance)
            store.save(block.key, arrays)
            yield block, arrays

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run_blocks(job: BlockJob, blocks: list[Block], scatter: Callable[[Block, dict], None], *,
               checkpoint: str | Path | None = None, keep_checkpoint: bool = False, executor=None,
               description: str = "kernel", unit: str = "pairs",
               progress: bool | None = True, valid: Callable[[Block, dict], bool] | None = None) -> BlockStats:
    """Compute every block not yet in the checkpoint folder and hand each block's arrays to `scatter`.

    `executor`: None (in-process) or a `DaskExecutor`. `valid(block, arrays)` rejects a stored block
    that does not fit (it is computed again). The folder is removed at the end unless `keep_checkpoint`.
    """
    started = time.perf_counter()
    store = BlockStore(checkpoint, job.fingerprint)
    pending = []
    for block in blocks:
        found = store.load(block.key, job.names)
        if found is not None and (valid is None or valid(block, found)):
            scatter(block, found)
        else:
            pending.append(block)
    executor = executor or InProcess()
    total = sum(b.work for b in blocks)
    with Meter(total, description, unit=unit, enabled=progress) as meter:
        meter.advance(total - sum(b.work for b in pending))
        for block, arrays in executor.map(job, pending, store, meter.advance):
            scatter(block, arrays)
    stats = BlockStats(len(blocks), len(blocks) - len(pending), total, sum(b.work for b in pending),
                       time.perf_counter() - started, executor.name)
    if not keep_checkpoint:
        store.remove()
    return stats


def _identity(value):
    return value


def _compute_block(job: BlockJob, block: Block, folder: str | None, names: tuple[str, ...]) -> dict:
    """Dask task: the block's arrays, from the folder if an earlier attempt stored them, else computed
    on this worker's JAX devices and written into the folder before they are returned."""
    import jax

    store = BlockStore(folder, job.fingerprint, create=False)
    found = store.load(block.key, names)
    if found is not None:
        return found  # a lost result (its worker died after writing) is read back, not recomputed
    arrays = job.compute(block, jax.local_devices(), lambda n: None)
    store.save(block.key, arrays)
    return arrays


class DaskExecutor:
    """Blocks as Dask distributed tasks: on a LocalCluster of `workers` processes, or on the cluster
    whose scheduler listens at `scheduler` (tcp://HOST:PORT).

    Each block is one task keyed `eqk-<fingerprint>-<block key>`; the worker writes the block into the
    checkpoint folder (shared storage on a cluster), the client gathers results as they complete.
    `retries` re-runs a task that raised; a task whose worker died `allowed_failures` + 1 times
    (LocalCluster; a remote scheduler uses its own setting) stops the run with one line.
    """

    def __init__(self, *, workers: int | None = None, scheduler: str | None = None, retries: int = 2,
                 connect_timeout: float = 5.0, allowed_failures: int = 3):
        self.workers, self.scheduler, self.retries = workers, scheduler, retries
        self.connect_timeout, self.allowed_failures = connect_timeout, allowed_failures
        self.client = self.cluster = None

    @property
    def name(self) -> str:
        return f"dask {self.scheduler}" if self.scheduler else f"dask LocalCluster({self.workers} workers)"

    def start(self) -> "DaskExecutor":
        """Connect (or start the LocalCluster) once; later calls reuse the client."""
        if self.client is not None:
            return self
        import dask
        from distributed import Client, LocalCluster

        if self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=f"{self.connect_timeout}s")
            except (OSError, TimeoutError, ValueError) as e:
                raise BlockError(f"cannot reach the Dask scheduler at {self.scheduler} within "
                                 f"{self.connect_timeout:g} s ({type(e).__name__})") from None
            return self
        workers = self.workers or os.cpu_count() or 1
        with dask.config.set({"distributed.scheduler.allowed-failures": self.allowed_failures}), \
                warnings.catch_warnings():
            # Its HTTP server falls back to a free port when 8787 is taken; no need to say so.
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            # Loopback only; one XLA process per worker, cores shared out between them.
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
                                        processes=True, host="127.0.0.1", dashboard_address=None)
            self.client = Client(self.cluster)
        return self

    def close(self) -> None:
        import logging

        nanny = logging.getLogger("distributed.nanny")
        level = nanny.level
        nanny.setLevel(logging.ERROR)  # a worker busy exiting JAX is killed after 4 s: expected, not news
        try:
            for part in (self.client, self.cluster):
                if part is not None:
                    part.close()
        finally:
            nanny.setLevel(level)
        self.client = self.cluster = None

    def __enter__(self):
        return self  # started by the first `map`, so bad input found before it costs no cluster

    def __exit__(self, *exc):
        self.close()

    def map(self, job: BlockJob, blocks: list[Block], store: BlockStore, advance) -> Iterator[tuple[Block, dict]]:
        if not blocks:
            return
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        client = self.start().client
        # The job (inputs, network) as a task of its own rather than scattered data: the scheduler keeps
        # its spec, so a copy lost with a dead worker is made again; each worker fetches it once.
        shared = client.submit(_identity, job, key=f"eqk-{job.fingerprint[:16]}-job", pure=False)
        folder = None if store.folder is None else str(store.folder.resolve())
        futures = {client.submit(_compute_block, shared, b, folder, tuple(job.names),
                                 key=f"eqk-{job.fingerprint[:16]}-{b.key}", retries=self.retries, pure=False): b
                   for b in blocks}
        try:
            for future in as_completed(futures):
                block = futures[future]
                try:
                    arrays = future.result()
                except KilledWorker:
                    raise BlockError(f"kernel block {block.key}: its worker died on every attempt; the finished "
                                     "blocks are kept in the checkpoint folder", store.folder) from None
                advance(block.work)
                future.release()
                yield block, arrays
        finally:
            client.cancel(list(futures))


def executor_from_options(cluster: str | None = None, scheduler: str | None = None, **kwargs) -> DaskExecutor | None:
    """None (in-process) or a DaskExecutor from `cluster` = 'local' / 'local:WORKERS' or `scheduler` = tcp://HOST:PORT."""
    if cluster and scheduler:
        raise InputError("give either --cluster or --scheduler, not both")
    if scheduler:
        if "://" not in scheduler:
            raise InputError(f"--scheduler must look like tcp://HOST:PORT, got {scheduler!r}")
        return DaskExecutor(scheduler=scheduler, **kwargs)
    if not cluster:
        return None
    kind, _, count = cluster.partition(":")
    if kind != "local" or (count and not (count.isdigit() and int(count) >= 1)):
        raise InputError(f"--cluster must be local or local:WORKERS (WORKERS >= 1), got {cluster!r}")
    return DaskExecutor(workers=int(count) if count else None, **kwargs)
