"""Chunked merging of host-resident leaves into huge-page-backed host memory.

Why: on CPU, XLA allocates every output buffer with malloc and the kernel is the
first to touch it, so a fresh 200 MB output costs ~50,000 page faults of 4 KiB
(about 2 us each on a virtual machine: 100 ms of CPU, more than the merge
arithmetic). Transparent huge pages would make that ~100 faults, but XLA does
not advise them; numpy does, for large arrays (which is why an allocating
`np.copy` is fast). So a leaf that lives in host memory (numpy, or a
single-device CPU `jax.Array`) and is large enough is merged chunk by chunk:

- XLA computes each chunk (`kernels.chunk_kernel`) into one of two
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

numpy operands are passed to XLA chunk by chunk, as views. XLA uses host memory
in place only where it is 64-byte aligned, and numpy's large arrays are not
(malloc puts them 16 bytes past a page boundary): passed whole, every operand
would be copied into fresh memory for each merge (page faults included: an
`average` of numpy inputs took 2-5x as long as of the same jax arrays). So the
chunk grid is laid on the first operand's aligned scalars, with a MINI-scalar
chunk for the few scalars before the grid and another after it; every chunk
view of an operand with the same alignment is then a zero-copy argument, and a
full chunk view that is still misaligned is copied into a recycled aligned
staging buffer that stays in cache.
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

from psm.merge import kernels as K

CHUNK = 1 << 19     # scalars per chunk (2 MiB of float32: staging stays in L2/L3)
MIN_SIZE = 1 << 19  # smaller leaves (one chunk or less) are merged by one kernel call
DEPTH = 2           # chunks in flight (dispatched, not yet copied out)
_HUGE = 2 << 20     # huge page size on x86-64 and aarch64 (4 KiB base pages)
ALIGN = 64          # bytes: XLA on CPU uses host memory in place only at this alignment
MINI = 64           # scalars per chunk before / after the aligned grid of numpy views


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
        # This process's CPU: with several processes devices("cpu")[0] is process 0's.
        return jax.local_devices(backend="cpu")[0]
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


def flat_views(leaf, base) -> tuple:
    """Flat numpy views of a host leaf's operands: the K inputs, then the base
    (or None). No copy for C-contiguous arrays, a `jax.Array` on the CPU
    included; other layouts are copied by the reshape."""
    # Rows of the stacked array's own view: indexing a jax.Array would copy a row.
    models = list(np.asarray(leaf.stacked)) if leaf.xs is None else leaf.xs
    views = tuple(np.asarray(x).reshape(-1) for x in models)
    return views + (None if base is None else np.asarray(base).reshape(-1),)


def numpy_views(leaf, base) -> tuple | None:
    """`flat_views` of a host leaf if any of its operands is a numpy array, else
    None (jax arrays are used whole, in place)."""
    if not any(isinstance(a, np.ndarray) for a in leaf.arrays + [base]):
        return None
    return flat_views(leaf, base)


def chunk_grid(n: int, views=None) -> list:
    """(flat start, length) of the chunks covering n scalars: CHUNK-scalar chunks,
    the last one moved back to end at n (it recomputes some of its predecessor's
    scalars, with the same bits), so that a leaf compiles one chunk kernel.

    With numpy `views` (see `numpy_views`) the CHUNK grid is laid on the first
    operand's ALIGN-aligned scalars, the last chunk moved back to the last
    aligned start that fits, and MINI-scalar chunks at either end cover the
    scalars outside it: chunk views of every operand aligned like the first
    are then zero-copy kernel arguments.
    """
    plain = [(min(start, n - CHUNK), CHUNK) for start in range(0, n, CHUNK)]
    if views is None:
        return plain
    item = views[0].itemsize
    per_align, skip = ALIGN // item, (-views[0].ctypes.data) % ALIGN
    mini = min(MINI, CHUNK)
    if skip % item or CHUNK % per_align or mini < per_align:
        return plain  # no aligned grid: misaligned views are copied
    first = skip // item
    last = n - CHUNK - (n - CHUNK - first) % per_align  # last aligned start that fits
    if last < first:
        return plain
    out = [(0, mini)] if first else []
    out += [(start, CHUNK) for start in range(first, last, CHUNK)] + [(last, CHUNK)]
    if last + CHUNK < n:  # fewer than per_align scalars left
        out.append((n - mini, mini))
    return out


@dataclasses.dataclass
class Job:
    """One leaf merged by `Stager`.

    Attributes:
        leaf: the `leaf_inputs.LeafInputs`.
        device: its CPU device.
        inputs, base: the kernel operands as jax arrays on `device` (None when
            `views` is set).
        views: for leaves with numpy operands, every operand as a flat numpy
            array (the K inputs, then the base or None), passed to the kernel
            chunk by chunk.
        body: key of `kernels.BODIES`.
        args: the body's array arguments.
        static: the body's static options, (name, value) pairs.
        offset: counter offset (select/dare `offset=`).
        out: flat host array receiving the result.
        check: check the result for NaN/inf.
        finite: whether every chunk was finite (when check).
        pending: chunks not yet copied out; the operands are released at 0.
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
    views: tuple | None = None
    finite: bool = True
    pending: int = 0

    def chunks(self):
        """(flat start, length) of every chunk (see `chunk_grid`)."""
        return chunk_grid(self.leaf.size, self.views)

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
        self._host_pool: dict[np.dtype, list] = collections.defaultdict(list)

    def add(self, leaf, body: str, args: tuple = (), static: tuple = (), *, base=None,
            offset: int = 0, check: bool = True) -> Job:
        """Queues the merge of one accepted leaf; returns its Job (done after `run`)."""
        device = host_device(leaf.arrays[0])
        inputs, views = leaf.inputs, numpy_views(leaf, base)
        if views is not None:  # sliced per chunk
            inputs = base = None
        job = Job(leaf=leaf, device=device, inputs=inputs, base=base, body=body,
                  args=tuple(args), static=tuple(static), offset=int(offset),
                  out=host_empty(leaf.size, leaf.dtype), check=check, views=views)
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
                chunks = job.chunks()
                job.pending = len(chunks)
                for start, size in chunks:
                    flight.append((job, start, *self._dispatch(job, start, size)))
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

    def _buffer(self, job, size):
        pool = self._pool[(job.device, job.out.dtype, size)]
        if pool:
            return pool.pop()
        return jnp.zeros(size, job.out.dtype, device=job.device)

    def _chunk_views(self, job, start, size):
        """The chunk's numpy operands: views, except that a misaligned view of a
        full chunk is copied into a recycled aligned staging buffer (XLA would
        copy it into fresh memory). Returns (operands, borrowed staging buffers)."""
        ops, borrowed = [], []
        for v in job.views:
            if v is None:
                ops.append(None)
                continue
            piece = v[start:start + size]
            if piece.ctypes.data % ALIGN and size == CHUNK:
                pool = self._host_pool[piece.dtype]
                buf = pool.pop() if pool else host_empty(CHUNK, piece.dtype)
                np.copyto(buf, piece)
                borrowed.append(buf)
                piece = buf
            ops.append(piece)
        return ops, borrowed

    def _dispatch(self, job, start, size):
        """Starts one chunk; returns (result, borrowed staging buffers)."""
        with x64_if_needed(job.leaf.dtype):
            if job.views is None:
                inputs, base, borrowed, stacked = job.inputs, job.base, [], job.leaf.xs is None
            else:
                ops, borrowed = self._chunk_views(job, start, size)
                inputs, base, stacked = tuple(ops[:-1]), ops[-1], False
            res = K.chunk_kernel(self._buffer(job, size), inputs, base, np.int32(start),
                                 np.uint32(job.offset), job.args, body=job.body,
                                 stacked=stacked, chunk=size, static=job.static,
                                 sliced=job.views is not None)
        return res, borrowed

    def _consume(self, job, start, res, borrowed):
        v = np.asarray(res)
        np.copyto(job.out[start:start + len(v)], v)
        if job.check and job.finite:
            job.finite = finite(v)
        del v  # no host view may outlive the buffer's next donation
        self._pool[(job.device, job.out.dtype, res.shape[0])].append(res)
        for buf in borrowed:  # the chunk is computed: its staged operands are free
            self._host_pool[buf.dtype].append(buf)
        job.pending -= 1
        if not job.pending:
            job.inputs = job.base = job.args = job.views = None
