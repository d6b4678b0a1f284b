"""How the scoring process uses glibc's heap (``mallopt``; elsewhere the allocator's own policy
stands, and every function here is a no-op).

Two kinds of allocation, two policies:

* **temporaries** (activations, logits blocks, gradients, quantizer round trips; the same sizes
  over and over): blocks of up to 32 MiB are taken from and given back to the heap, whose top
  keeps up to 256 MiB of free memory, so that each is reused instead of mapped and page-faulted
  in afresh (:func:`keep_heap`);
* **a piece's weights** (one decoder layer at a time, freed when the next one loads): a block
  of 1 MiB or more that the heap's free memory cannot hold is mapped, and unmapped on free
  (:func:`weights_mapped`), rather than growing the heap: the heap never grows to hold a
  layer's weights between saved activations, where that memory would never be given back (an
  8B model's heap grew by gigabytes that way).

Between the pass's phases (:func:`give_back`) the heap's free memory is given back to the system
(``malloc_trim``: the free pages inside it too), so that what one phase kept for its temporaries
does not add to the next phase's peak: the forward pass's windows, kept in the heap, and the
head's logits, mapped, would otherwise add up (the 8B shape: 7.8 GB against 6.6).

The mmap threshold is one setting of the whole process, so :func:`weights_mapped` sets it for
the allocation of the weights alone and puts :func:`keep_heap`'s back after it. (glibc serves a
block from the heap's free memory when it can, whatever the threshold; the threshold decides
between growing the heap and mapping.)
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
KEEP = 32 << 20  # temporaries up to this size stay in the heap (glibc's largest threshold)
MAPPED = 1 << 20  # a piece's weights from this size on are mapped
TRIM = 256 << 20  # free memory at the top of the heap beyond this is given back


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - (present under glibc)
        return libc
    except (OSError, AttributeError):
        return None


def keep_heap() -> bool:
    """Keep freed temporaries of up to 32 MiB in the heap (the threshold fixed at 32 MiB, the
    heap's top trimmed only beyond 256 MiB, grown 64 MiB at a time); False where not glibc.
    Set by every :class:`lwq_gguf.model.stream.LayerStream`, for its pass and what follows."""
    libc = _libc()
    return libc is not None and all(libc.mallopt(opt, val) == 1 for opt, val in (
        (M_MMAP_THRESHOLD, KEEP), (M_TRIM_THRESHOLD, TRIM), (M_TOP_PAD, 64 << 20)))


@contextmanager
def weights_mapped() -> Iterator[None]:
    """Within: allocations of 1 MiB or more are mapped (a piece's weights); after: 32 MiB."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MAPPED)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, KEEP)


def give_back() -> None:
    """Give the heap's free memory back to the system (between phases, see above)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
