"""Measuring memory: peak bytes of a block of work, on CUDA or on the CPU."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class PeakMemory:
    """Filled in when the ``measure_peak_memory`` block exits.

    ``peak_mib``: on CUDA ``torch.cuda.max_memory_allocated`` during the block; on CPU the highest
    resident set size sampled every ``interval_s``, minus the resident size when the block began
    (so it counts what the block added, not the interpreter and libraries already loaded).
    """

    device: str
    peak_mib: float = 0.0


@contextmanager
def measure_peak_memory(device: str = "cpu", interval_s: float = 0.005):
    """Context manager yielding a :class:`PeakMemory` for the work inside the block."""
    import psutil
    import torch

    result = PeakMemory(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.peak_mib = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result.peak_mib = (peak[0] - baseline) / 2**20
