"""The scoring process's heap policy (model.heap), observed in a child process through glibc's
own accounting (mallinfo2: bytes in mapped blocks), and the process runner's collector."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import ctypes, numpy as np
from lwq_gguf.model.heap import keep_heap, weights_mapped

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                              "usmblks", "fsmblks", "uordblks", "fordblks",
                                              "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
mapped = lambda: libc.mallinfo2().hblkhd

assert keep_heap()
before = mapped()
with weights_mapped():
    weight = np.ones(4 << 20, np.uint8)  # a piece's 4 MiB weight: mapped
as_weight = mapped() - before
temp = np.ones(4 << 20, np.uint8)       # a 4 MiB temporary: from the heap (grown by 64 MiB)
again = np.ones(4 << 20, np.uint8)      # and another, from what the heap keeps
print(as_weight, mapped() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="the heap policy is glibc's mallopt")
def test_temporaries_stay_in_the_heap_and_weights_are_mapped():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    as_weight, after = map(int, out)
    assert as_weight >= 4 << 20
    assert after == as_weight  # (the temporaries: no mapped byte more)


def test_heap_policy_is_a_no_op_elsewhere():
    from lwq_gguf.model.heap import keep_heap, weights_mapped

    assert keep_heap() is GLIBC
    with weights_mapped():
        pass


def test_a_process_runs_with_the_collector_tuned_and_frozen_at_the_end():
    """lwq_gguf.process.run_process: main's exit code, the youngest generation's threshold
    raised while it runs, the objects alive at its end frozen (the exit walks none of them)."""
    probe = ("import gc; from lwq_gguf.process import GEN0, run_process\n"
             "seen = []\n"
             "rc = run_process(lambda: seen.append(gc.get_threshold()[0]) or 3)\n"
             "print(rc, seen[0] == GEN0, gc.get_freeze_count() > 1000)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["3", "True", "True"]
