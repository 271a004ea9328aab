"""A crash- and hang-tolerant process pool for per-file work (decoding, featurizing).

Each worker is its own spawned process with its own pipe: the parent knows which job
every worker is on and since when. A worker that dies (a decoder crashing on a corrupt
file, the out-of-memory killer) costs only the job it was on; a worker that takes longer
than `timeout` seconds on one job (a decoder that hangs) is killed and that job fails
"timed out". Either way a fresh worker takes the remaining jobs and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.connection import Connection, wait
from types import GeneratorType

from genreclf.errors import GenreclfError

log = logging.getLogger(__name__)

CHUNK = 4  # jobs per message: fewer round trips between the parent and its workers
IN_FLIGHT_PER_WORKER = 2 * CHUNK  # jobs queued per worker: results never pile up in the parent
# Seconds one clip may take in a worker before its decoder counts as hung. A 30-s FMA clip takes
# 0.05 s of CPU here (README); 60 s leaves a 1000x margin for slow disks and loaded machines.
CLIP_TIMEOUT = 60.0
_READY = "ready"


def _worker_main(conn: Connection, work: Callable, init: Callable | None) -> None:
    """Run jobs received on `conn`; send back (index, items, done) messages, in order.

    A plain `work` gives one message (index, (result,), True). A generator `work` streams:
    (index, (item,), False) for each item it yields, then (index, (), True). The pipe's buffer
    is the backpressure: a worker blocks on send until the parent has read what it sent.
    """
    # Ctrl-C reaches the whole process group: the parent handles it (and stops us); no tracebacks from here.
    # (Started from the main thread, we have ignored it since exec: see _children_ignore_sigint.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if init is not None:
        init()
    try:
        conn.send(_READY)
        while True:
            chunk = conn.recv()
            if chunk is None:
                return
            for index, job in chunk:
                result = work(job)
                if isinstance(result, GeneratorType):
                    for item in result:
                        conn.send((index, (item,), False))
                    conn.send((index, (), True))
                else:
                    conn.send((index, (result,), True))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent closed our pipe or is gone (stopped by a Ctrl-C, killed): nobody to answer


def default_workers() -> int:
    """One worker process per usable core, shared among the ranks on this machine under torchrun."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started within the block ignore SIGINT from their first instruction on (main thread only).

    A signal ignored at exec stays ignored, and Python then installs no KeyboardInterrupt handler: a
    Ctrl-C while a worker still imports (torch takes a second, more on a busy machine) prints no
    traceback. A blocked mask is not enough: the spawn start method clears it in the child. Meanwhile
    SIGINT is blocked here, so a Ctrl-C in the window is delivered to us afterwards, not lost (Linux keeps
    a blocked signal pending whatever its action). Elsewhere than the main thread, Python cannot change
    signal actions: a worker started there ignores SIGINT only once _worker_main runs.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    jobs: deque = field(default_factory=deque)  # (index, job) sent and not yet answered, in order
    since: float = 0.0  # when the job at jobs[0] started (ready, or the previous answer)


class Pool:
    """`n_workers` worker processes running `work` jobs, started now (see pool_imap)."""

    def __init__(self, n_workers: int, work: Callable, init: Callable | None):
        self.ctx = mp.get_context("spawn")  # fork after torch/OpenMP start-up can deadlock
        self.work, self.init = work, init
        self.workers = [self._start() for _ in range(n_workers)]

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=_worker_main, args=(child, self.work, self.init), daemon=True)
        with _children_ignore_sigint():
            process.start()
        child.close()
        return _Worker(process, parent)

    def replace(self, worker: _Worker) -> None:
        """Kill `worker` and put a fresh process in its place."""
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()
        self.workers[self.workers.index(worker)] = self._start()

    def close(self) -> None:
        """Ask every worker to stop; kill those that have not within 5 s."""
        for worker in self.workers:
            with contextlib.suppress(OSError):  # a dead worker's pipe is already closed
                worker.conn.send(None)
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1)
            worker.conn.close()


def pool_map(
    jobs: list,
    n_workers: int,
    record: Callable[[object], None],
    work: Callable,
    failed: Callable[[object, str], object],
    timeout: float = CLIP_TIMEOUT,
    init: Callable | None = None,
) -> None:
    """Run `work(job)` for every job in `n_workers` processes and pass each result to `record`, in any order.

    As `pool_imap`, with a callback.
    """
    for result in pool_imap(jobs, n_workers, work, failed, timeout, init):
        record(result)


def pool_imap(
    jobs: Iterable,
    n_workers: int,
    work: Callable,
    failed: Callable[[object, str], object],
    timeout: float = CLIP_TIMEOUT,
    init: Callable | None = None,
    pool: Pool | None = None,
) -> Iterator:
    """Run `work(job)` for every job in `n_workers` processes; yield the results as they come, in any order.

    A generator `work` streams: each item it yields is yielded here as soon as it arrives (items of one
    job in order), so a job's output never has to fit in one message. Jobs are taken from `jobs` as
    workers need them (a few per worker in flight), so neither jobs nor results pile up in the parent.
    A job whose worker dies or sends nothing for `timeout` seconds yields `failed(job, reason)` as its
    last item. Time the caller spends between two items does not count against the workers' timeout
    (they wait on the caller then). `work`, `failed` and `init` (run once in each new worker) must be
    importable functions. Raises GenreclfError when workers keep dying before any job gives a result.
    `pool`: workers already started (in the main thread, their start-up ignores Ctrl-C), used and closed.
    """
    fresh = enumerate(jobs)
    queue: deque = deque()  # jobs taken back from dead workers, tried first
    exhausted = False

    def take(n: int) -> list:
        nonlocal exhausted
        chunk = [queue.popleft() for _ in range(min(n, len(queue)))]
        if len(chunk) < n and not exhausted:
            new = list(islice(fresh, n - len(chunk)))
            exhausted = len(new) < n - len(chunk)
            chunk += new
        return chunk

    first = take(max(1, n_workers))
    if not first:
        if pool is not None:
            pool.close()
        return
    queue.extend(first)
    pool = pool or Pool(max(1, min(n_workers, len(first))), work, init)
    finished, deaths_before_any = 0, 0
    strikes: dict = {}  # job index -> workers it was on when they died, before anything worked
    try:
        while queue or not exhausted or any(w.jobs for w in pool.workers):
            now = time.monotonic()
            for worker in pool.workers:  # keep every ready worker's pipe fed
                while worker.ready and len(worker.jobs) < IN_FLIGHT_PER_WORKER:
                    chunk = take(CHUNK)
                    if not chunk:
                        break
                    if not worker.jobs:
                        worker.since = now
                    worker.jobs.extend(chunk)
                    try:
                        worker.conn.send(chunk)
                    except OSError:  # it died since we last looked: its sentinel says so below
                        break
            waits = [w.since + timeout - now for w in pool.workers if w.ready and w.jobs]
            handles = {w.conn: w for w in pool.workers} | {w.process.sentinel: w for w in pool.workers}
            ready = wait(list(handles), timeout=max(0.0, min(waits)) if waits else 30.0)
            for handle in ready:
                worker = handles[handle]
                if worker not in pool.workers:  # already replaced in this round
                    continue
                try:
                    while worker.conn.poll():
                        message = worker.conn.recv()
                        if message == _READY:
                            worker.ready, worker.since = True, time.monotonic()
                            continue
                        _, items, done = message
                        if done:
                            worker.jobs.popleft()
                        worker.since = time.monotonic()
                        finished += 1  # a streamed item counts too: once one is out, a death is the file's fault
                        for item in items:
                            paused = time.monotonic()
                            yield item
                            paused = time.monotonic() - paused
                            for w in pool.workers:  # they were blocked on us, not hung
                                w.since += paused
                except (EOFError, OSError):
                    pass
                if not worker.process.is_alive():
                    if finished == 0:  # nothing has worked yet: the workers, not the files, may be at fault
                        deaths_before_any += 1
                        if deaths_before_any >= 3:
                            raise GenreclfError(
                                f"worker processes died {deaths_before_any} times before finishing a single file; "
                                'called from a script? put the call under `if __name__ == "__main__":` '
                                "(or check memory and the first files)"
                            )
                        head = worker.jobs[0][0] if worker.jobs else None
                        strikes[head] = strikes.get(head, 0) + 1
                        if head is not None and strikes[head] >= 2:  # the same job killed two workers: its fault
                            yield from _lose_current(
                                worker,
                                queue,
                                failed,
                                "the decoder crashed (its process died); the file is probably corrupt",
                            )
                        elif worker.jobs:  # tried again after the others, blamed if it kills again
                            suspect = worker.jobs.popleft()
                            queue.extendleft(reversed(worker.jobs))
                            queue.append(suspect)
                            worker.jobs.clear()
                    else:
                        yield from _lose_current(
                            worker,
                            queue,
                            failed,
                            "the decoder crashed (its process died); the file is probably corrupt",
                        )
                    pool.replace(worker)
            now = time.monotonic()
            for worker in list(pool.workers):
                if worker.ready and worker.jobs and now - worker.since > timeout:
                    lost = list(
                        _lose_current(worker, queue, failed, f"the decoder timed out (no result after {timeout:g} s)")
                    )
                    pool.replace(worker)
                    yield from lost
    finally:
        pool.close()


def _lose_current(worker: _Worker, queue: deque, failed: Callable, reason: str) -> Iterator:
    """Yield the failure of the job `worker` was on; put the jobs queued behind it back at the front."""
    lost = worker.jobs.popleft()[1] if worker.jobs else None
    queue.extendleft(reversed(worker.jobs))
    worker.jobs.clear()
    if lost is not None:
        log.warning("%s", reason)
        yield failed(lost, reason)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class ReadAhead:
    """The items of an iterator, taken from it from now on by a thread into a queue of `size` (memory bounded).

    Iterate once. Leaving the iteration early, or close(), ends the thread and closes the source (a
    pool_imap then stops its workers); an exception of the source is raised in the iterating thread.
    """

    def __init__(self, items: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="genreclf-read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    break
        except BaseException as e:  # raised again in the caller's thread, where it belongs
            self._put(_Raised(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            self._put(_DONE)

    def __iter__(self) -> Iterator:
        try:
            while (item := self._queue.get()) is not _DONE:
                if isinstance(item, _Raised):
                    raise item.error
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading ahead; wait a while for the source to be closed."""
        self._stop.set()
        self._thread.join(10)  # a worker that hangs is stopped by the pool's timeout; past this, daemon threads die
