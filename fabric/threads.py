"""CPU threads of an instance process: the engine thread keeps the OpenMP pool to itself.

torch's CPU kernels, built with GNU OpenMP (libgomp), fork a team of worker threads in whichever
thread first runs a parallel op and keep it, idle, for that thread's life. libgomp counts the
workers of every team in the process; once they outnumber the cores it stops spinning between
parallel regions and puts workers to sleep instead, so each of the thousands of small parallel
regions in a decode step pays a wake-up. Measured on 2 cores (SmolLM2-135M, float32, one token):
42 ms a step in a thread that holds the process's only pool, 70-110 ms once any other thread
had run a single matmul, 68 ms against 105 ms per output token in a running instance.

So an instance hands back the pool of every thread other than the engine loop once its torch
work is done: the thread that built the engine (loading weights), and the threads that serve
creditors' partials, hand-offs and tier loads. `release_pool` costs the next parallel op in that
thread a fresh team (tens of microseconds); it does nothing where torch does not use libgomp.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

OMP_PAUSE_SOFT = 1       # omp_pause_soft: release the threads, keep nothing


@functools.cache
def _pause():
    """libgomp's `omp_pause_resource_all`, or None (no OpenMP, another runtime, or too old)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    own = os.path.dirname(torch.__file__)       # torch's bundled copy first: the one it runs on
    for path in sorted(_loaded_gomp(), key=lambda p: not p.startswith(own)):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def _loaded_gomp() -> list[str]:
    """Paths of the libgomp copies this process has mapped (torch wheels bundle their own; a
    copy not yet mapped is not torch's, and loading it would only start another runtime)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libgomp" in line})
    except OSError:
        return []


def release_pool() -> bool:
    """Hand back the calling thread's OpenMP worker threads; True when there was a runtime to
    ask. Call it in a thread beside the engine loop after its torch work."""
    fn = _pause()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0


def beside_engine(method):
    """Decorator: the method's thread hands back its OpenMP pool when the method returns."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        finally:
            release_pool()
    return wrapper
