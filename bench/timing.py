"""Timing and memory: contenders alternated round by round, medians, peak memory of a stretch of work."""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (children's cwd)


def alternate(contenders: dict[str, Callable[[], None]], rounds: int, warmup: int,
              sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each contender: ``warmup`` untimed calls each, then ``rounds`` rounds
    in which every contender runs once, the order rotating by one each round. Python's garbage
    collector is held off while timing so that it lands on no one contender."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                sync()
                start = time.perf_counter()
                contenders[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def peak_memory_during(work: Callable[[], None], device: torch.device) -> dict:
    """Peak memory that ``work()`` adds to what this process already holds.

    CUDA: torch.cuda.max_memory_allocated during the work, minus the allocation before it. CPU:
    the kernel's peak-RSS mark is reset to the current RSS (``5 > /proc/self/clear_refs``) and read
    back (VmHWM) afterwards, so run this in a fresh process per contender, or one contender's
    freed memory is reused by the next. Elsewhere, ru_maxrss growth (a lower bound).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated() - before,
                "memory_method": "torch.cuda.max_memory_allocated during the steps, minus the allocation before them"}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    except OSError:  # not Linux: the process's lifetime peak, which may still be the model build's
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        work()
        return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before,
                "memory_method": "ru_maxrss growth during the steps (a lower bound: no peak-RSS reset here)"}
    before = proc_status_bytes("VmRSS")
    work()
    return {"peak_memory_bytes": proc_status_bytes("VmHWM") - before, "baseline_rss_bytes": before,
            "memory_method": "a fresh process per contender; peak RSS (VmHWM, reset once the model and AdamW "
                             "were built) during the steps, minus the RSS at that reset"}


def proc_status_bytes(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def usage() -> dict:
    """This process's CPU seconds (user, system) and minor page faults so far (getrusage): what a
    change to the allocator costs, read where the machine's load makes wall time unreliable."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_seconds": r.ru_utime, "system_seconds": r.ru_stime, "minor_faults": r.ru_minflt}


# Whether keep_off_xla set USE_TORCH_XLA for this process (the children get the user's setting back).
_SET_USE_TORCH_XLA = False


def keep_off_xla() -> None:
    """Keep this process's transformers off XLA, unless the user set USE_TORCH_XLA. Nothing here
    runs XLA (the xla section runs its loops in subprocesses); without it transformers imports
    accelerate, which imports torch_xla wherever it is installed: seconds of start-up and a
    "Defaulting to PJRT_DEVICE=CPU" warning."""
    global _SET_USE_TORCH_XLA
    if "USE_TORCH_XLA" not in os.environ:
        os.environ["USE_TORCH_XLA"] = "0"
        _SET_USE_TORCH_XLA = True


def child_env() -> dict:
    """The environment of the benchmark's subprocesses: this checkout's code first, and the
    user's own USE_TORCH_XLA (the xla section's children run XLA)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if _SET_USE_TORCH_XLA:
        del env["USE_TORCH_XLA"]
    return env
