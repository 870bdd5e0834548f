"""Sizes checked before anything is allocated: a request that cannot fit in this machine's memory
(a batch of 10⁹ images, 10¹² samples, a class table of 2⁴⁰ rows) is one error line at once, not a
MemoryError or a kill by the system after minutes of work and a run folder left behind.

The estimates are lower bounds of what the work holds at once (the inputs alone, not the activations),
so a size refused here could never have run; one that passes may still need more.
"""
from __future__ import annotations

import os


def memory_bytes() -> int:
    """The physical memory of this machine (RAM; a GPU's is smaller still)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check rather than a wrong one
        return 2 ** 62


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e15 else f"{n:.2e} bytes"


def check_fits(nbytes: float, what: str, fix: str, error=ValueError) -> None:
    """`error` (one line) when `nbytes` exceed the machine's memory: `what` needs them, `fix` says what to pass."""
    have = memory_bytes()
    if nbytes > have:
        raise error(f"{what} needs at least {gb(nbytes)}, more than the {gb(have)} of memory of this machine; {fix}")
