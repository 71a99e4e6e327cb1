"""Peak memory of a piece of work on CPU, from Linux's accounting of the process.

torch's CPU allocator keeps no peak statistics (``torch.cuda.max_memory_allocated`` has
no CPU twin) and tracemalloc sees only Python's own allocations, so the peak is read
from the kernel: the peak resident set (VmHWM, reset through ``/proc/self/clear_refs``)
above the resident set before the work. The process must run with glibc's mmap
threshold pinned low (``MMAP_THRESHOLD_ENV``) so that freed buffers go back to the
system at once instead of staying resident in the heap; run each measurement in a fresh
process so that no earlier work shapes the heap."""

from __future__ import annotations

from pathlib import Path

MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}


def available() -> bool:
    return Path("/proc/self/clear_refs").exists()


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def peak_growth_mib(work) -> float:
    """MiB the resident set grew to at its peak while ``work()`` ran."""
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    work()
    return (_status_kib("VmHWM") - before) / 2**10
