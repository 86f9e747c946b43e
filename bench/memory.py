"""Peak memory of one piece of work, printed next to its time by the benchmarks.

On CUDA it is torch's peak allocated memory (``torch.cuda.max_memory_allocated``, reset at the start). On CPU it is
the process's peak resident set size while the work ran: a thread samples ``/proc/self/statm`` every millisecond (the
kernel's ``ru_maxrss`` only knows the peak of the whole process so far, which an earlier, larger step would hide).
The sampled peak can miss a spike shorter than the interval; the increase over the resident size at the start is
what the work itself added.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Peak:
    """What ``peak_memory`` measured, in bytes."""

    peak: int = 0  # peak allocated (CUDA) or peak resident set size (CPU)
    added: int = 0  # the peak minus the value at the start

    def __str__(self) -> str:
        return f"peak {self.peak / 2**30:.2f} GiB (+{self.added / 2**30:.2f} GiB)"


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the process's peak so far (kilobytes on Linux, bytes on macOS)
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu", interval: float = 1e-3):
    """``with peak_memory(device) as peak: work()`` then ``print(peak)``."""
    result = Peak()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak = torch.cuda.max_memory_allocated(device)
            result.added = result.peak - start
        return
    start = _resident_bytes()
    highest = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            highest[0] = max(highest[0], _resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result.peak = max(highest[0], _resident_bytes())
        result.added = result.peak - start
