"""Two threads of one core each, where a team of two threads per op would wait on itself.

The models' ops are small: a team of 2 intra-op threads meets at every one (and libgomp's idle team
member spins for a few ms after each, taking turns with any other thread). Two independent halves of
the work on two threads of one intra-op thread each keep both cores busy instead, as Keras runs the two
directions of its Bidirectional GRU. Used for the two directions of each GRU layer (genreclf.fastgru)
and for the two halves of a Transformer's batch (genreclf.lightning_modules), during a CPU fit.

The second thread runs with the caller's grad, inference and CPU autocast modes (all are per thread)
and, if asked, its own random generator (`generator`), so that runs stay reproducible.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

_local = threading.local()  # .busy: this thread is one of a pair; .generator: its random generator


class _Twin:
    """The second thread: runs one function at a time, with the thread count and modes it is given."""

    def __init__(self):
        self.pid, self.jobs = os.getpid(), queue.SimpleQueue()
        threading.Thread(target=self._serve, name="genreclf-twin", daemon=True).start()

    def _serve(self) -> None:
        _local.busy = True  # a pair asked for from here runs in turn: this thread is its own pair's half
        while True:
            fn, args, threads, (grad, inference, autocast, dtype), done = self.jobs.get()
            try:
                if torch.get_num_threads() != threads:  # intra-op threads are set per thread
                    torch.set_num_threads(threads)
                with (
                    torch.inference_mode(inference),
                    torch.set_grad_enabled(grad),
                    torch.autocast("cpu", dtype=dtype, enabled=autocast),
                ):
                    done.put((fn(*args), None))
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                done.put((None, e))

    def pair(self, fn: Callable, mine: tuple, theirs: tuple, threads: int) -> tuple[Any, Any]:
        """Run fn(*mine) here and fn(*theirs) there, `threads` intra-op threads between them; return both."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        modes = (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
        )
        self.jobs.put((fn, theirs, threads - threads // 2, modes, done))
        before = torch.get_num_threads()
        torch.set_num_threads(threads // 2)
        _local.busy = True
        try:
            result = fn(*mine)
        finally:
            _local.busy = False
            other, error = done.get()  # always: the other half may write into this call's tensors
            torch.set_num_threads(before)
        if error is not None:
            raise error
        return result, other


_twin: _Twin | None = None
_fit_threads = 0  # within side_by_side(): the process's intra-op threads, shared by the two halves


@contextlib.contextmanager
def side_by_side() -> Iterator[bool]:
    """Within the block, the process keeps half its intra-op threads (1 of 2) and `pair` hands the other half
    to the second thread. Yields whether it did; a no-op in a process of one thread (e.g. one of 2 DDP ones).

    Outside it, `pair` splits the threads for the length of each call only, and the team of 2 that the ops
    before left spinning takes turns with the second thread (measured: the GRU up to 20% slower at crop 128).
    """
    global _fit_threads
    threads = torch.get_num_threads()
    if threads < 2 or _fit_threads:
        yield bool(_fit_threads)
        return
    torch.set_num_threads(threads // 2)
    _fit_threads = threads
    try:
        yield True
    finally:
        _fit_threads = 0
        torch.set_num_threads(threads)


def paired() -> bool:
    """Whether this thread is within side_by_side() and free to `pair`."""
    return bool(_fit_threads) and not getattr(_local, "busy", False)


def pair(fn: Callable, first: tuple, second: tuple) -> tuple[Any, Any]:
    """Return (fn(*first), fn(*second)), run side by side on two threads when the process has 2+, else in turn."""
    global _twin
    threads = _fit_threads or torch.get_num_threads()
    if threads < 2 or getattr(_local, "busy", False):
        return fn(*first), fn(*second)
    if _twin is None or _twin.pid != os.getpid():  # a forked child has no thread of its parent's
        _twin = _Twin()
    return _twin.pair(fn, first, second, threads)


@contextlib.contextmanager
def generator(seed: int) -> Iterator[torch.Generator]:
    """Within the block, this thread's dropout masks (genreclf.fastops) are drawn from a generator of `seed`."""
    before = getattr(_local, "generator", None)
    _local.generator = torch.Generator().manual_seed(seed)
    try:
        yield _local.generator
    finally:
        _local.generator = before


def thread_generator() -> torch.Generator | None:
    """The random generator `generator` gave this thread, or None (torch's default generator)."""
    return getattr(_local, "generator", None)
