"""Chunked merging of host-resident leaves into huge-page-backed host memory.

Why: on CPU, XLA allocates every output buffer with malloc and the kernel is the
first to touch it, so a fresh 200 MB output costs ~50,000 page faults of 4 KiB
(about 2 us each on a virtual machine: 100 ms of CPU, more than the merge
arithmetic). Transparent huge pages would make that ~100 faults, but XLA does
not advise them; numpy does, for large arrays (which is why an allocating
`np.copy` is fast). So a leaf that lives in host memory (numpy, or a
single-device CPU `jax.Array`) and is large enough is merged chunk by chunk:

- XLA computes each chunk (`_merge_kernels.chunk_kernel`) into one of two
  donated staging buffers, which are recycled from chunk to chunk and leaf to
  leaf, so they stay in cache and never fault;
- while XLA computes the next chunk, a worker thread copies the finished one
  into a 2 MiB-aligned numpy array (huge pages) and checks it for NaN/inf while
  it is still in cache (a sum: no extra pass over the output);
- the result is returned as that numpy array, or wrapped zero-copy as a
  `jax.Array` on the input's device.

Chunks are consecutive row-major scalars; the last chunk of a leaf is moved
back to end at the leaf's end (it overlaps its predecessor and recomputes the
same values), so every chunk has the same static length and a leaf compiles
one chunk kernel.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psm import _merge_kernels as K

CHUNK = 1 << 19     # scalars per chunk (2 MiB of float32: staging stays in L2/L3)
MIN_SIZE = 1 << 19  # smaller leaves (one chunk or less) are merged by one kernel call
DEPTH = 2           # chunks in flight (dispatched, not yet copied out)
_HUGE = 2 << 20     # huge page size on x86-64 and aarch64 (4 KiB base pages)


@contextlib.contextmanager
def x64_if_needed(dtype):
    """float64 leaves (numpy) need jax's 64-bit mode for the duration of their kernels."""
    if np.dtype(dtype).itemsize == 8 and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            yield
    else:
        yield


def host_empty(size: int, dtype) -> np.ndarray:
    """Uninitialised flat numpy array whose data starts on a 2 MiB boundary.

    numpy advises transparent huge pages for large allocations; aligning the
    start lets every 2 MiB of the result be one huge page (one page fault).
    """
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    raw = np.empty(nbytes + _HUGE, np.uint8)
    skip = (-raw.ctypes.data) % _HUGE
    return raw[skip:skip + nbytes].view(dtype)


def host_device(x):
    """The CPU device of a single-device host array, or None if x is not one."""
    if isinstance(x, np.ndarray):
        return jax.devices("cpu")[0]
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return None
    devices = x.devices()
    if len(devices) != 1:
        return None
    (dev,) = devices
    return dev if dev.platform == "cpu" else None


def accepts(leaf) -> bool:
    """Whether the leaf is merged here: host-resident inputs (and base) on one
    CPU device, at least MIN_SIZE scalars (below 2^31, for int32 chunk starts)."""
    if not max(MIN_SIZE, CHUNK) <= leaf.size < 2**31:
        return False
    devices = {host_device(a) for a in leaf.arrays}
    if len(devices) != 1 or None in devices:
        return False
    return True


def finite(v: np.ndarray) -> bool:
    """True where every element of the flat float array v is finite.

    A sum is finite only if every term is (inf and NaN propagate), so the fast
    check is one vectorised sum with no temporary array; a non-finite sum
    (possibly a finite overflow) is confirmed element by element.
    """
    if not v.size:
        return True
    if v.dtype.itemsize >= 4:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(v)):
                return True
    return bool(np.isfinite(v.astype(np.float32) if v.dtype.itemsize < 4 else v).all())


@dataclasses.dataclass
class Job:
    """One leaf merged by `Stager`.

    Attributes:
        leaf: the `_merge_tree.LeafInputs`.
        device: its CPU device.
        inputs, base: the kernel operands as jax arrays on `device`.
        body: key of `_merge_kernels.BODIES`.
        args: the body's array arguments.
        static: the body's static options, (name, value) pairs.
        offset: counter offset (select/dare `offset=`).
        out: flat host array receiving the result.
        check: check the result for NaN/inf.
        finite: whether every chunk was finite (when check).
        pending: chunks not yet copied out; the operands are released at 0 (numpy
            inputs were copied to the device for the kernels).
    """

    leaf: Any
    device: Any
    inputs: Any
    base: Any
    body: str
    args: tuple
    static: tuple
    offset: int
    out: np.ndarray
    check: bool
    finite: bool = True
    pending: int = 0

    def chunks(self):
        """Flat start of every chunk (the last one moved back to end at the end)."""
        n = self.leaf.size
        return [min(start, n - CHUNK) for start in range(0, n, CHUNK)]

    def result(self):
        """The merged leaf: read-only numpy for numpy inputs, else a jax.Array
        on the input's device sharing the host array's memory."""
        out = self.out.reshape(self.leaf.shape)
        out.flags.writeable = False
        if self.leaf.to_numpy:
            return out
        return jax.device_put(out, self.device)


_DONE = object()


class Stager:
    """Runs queued jobs as one chunk pipeline in a worker thread (see module doc).

    `add` queues a leaf and returns at once, so the caller can prepare further
    leaves (or, for TIES, search the next thresholds) while earlier leaves are
    merged; `run` waits for every queued job. The worker's host work (copies,
    checks) runs in numpy, which releases the GIL.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool: dict[tuple, list] = collections.defaultdict(list)

    def add(self, leaf, body: str, args: tuple = (), static: tuple = (), *, base=None,
            offset: int = 0, check: bool = True) -> Job:
        """Queues the merge of one accepted leaf; returns its Job (done after `run`)."""
        device = host_device(leaf.arrays[0])
        def put(a):  # numpy operands become device arrays once, not once per chunk
            return a if isinstance(a, jax.Array) else jax.device_put(a, device)

        with x64_if_needed(leaf.dtype):
            inputs = put(leaf.stacked) if leaf.xs is None else tuple(put(x) for x in leaf.xs)
            base = None if base is None else put(base)
        job = Job(leaf=leaf, device=device, inputs=inputs, base=base, body=body,
                  args=tuple(args), static=tuple(static), offset=int(offset),
                  out=host_empty(leaf.size, leaf.dtype), check=check)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="psm-merge-stage",
                                            daemon=True)
            self._thread.start()
        self._queue.put(job)
        return job

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.run()
        else:
            self.close()

    def close(self) -> None:
        """Stops the worker after the queued jobs, discarding any worker error (for
        callers that are already raising their own)."""
        try:
            self.run()
        except Exception:  # noqa: BLE001 - the caller's exception wins
            pass

    def run(self) -> None:
        """Waits until every queued job is merged; re-raises a worker error."""
        if self._thread is None:
            return
        self._queue.put(_DONE)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self):
        flight = collections.deque()
        try:
            job = self._queue.get()
            while job is not _DONE:
                starts = job.chunks()
                job.pending = len(starts)
                for start in starts:
                    flight.append((job, start, self._dispatch(job, start)))
                    if len(flight) >= DEPTH:
                        self._consume(*flight.popleft())
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:  # nothing queued yet: finish what is in flight
                    while flight:
                        self._consume(*flight.popleft())
                    job = self._queue.get()
            while flight:
                self._consume(*flight.popleft())
        except BaseException as e:  # noqa: BLE001 - re-raised by run()
            self._error = e
            while self._queue.get() is not _DONE:
                pass

    def _buffer(self, job):
        pool = self._pool[(job.device, job.out.dtype)]
        if pool:
            return pool.pop()
        return jnp.zeros(CHUNK, job.out.dtype, device=job.device)

    def _dispatch(self, job, start):
        with x64_if_needed(job.leaf.dtype):
            return K.chunk_kernel(self._buffer(job), job.inputs, job.base, np.int32(start),
                                  np.uint32(job.offset), job.args, body=job.body,
                                  stacked=job.leaf.xs is None, chunk=CHUNK,
                                  static=job.static)

    def _consume(self, job, start, res):
        v = np.asarray(res)
        np.copyto(job.out[start:start + CHUNK], v)
        if job.check and job.finite:
            job.finite = finite(v)
        del v  # no host view may outlive the buffer's next donation
        self._pool[(job.device, job.out.dtype)].append(res)
        job.pending -= 1
        if not job.pending:
            job.inputs = job.base = job.args = None
