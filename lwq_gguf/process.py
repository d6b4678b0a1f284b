"""How a lwq-gguf process runs: the CLI and each child it starts (the converter child, the
evaluation child) go through :func:`run_process`.

Python's cycle collector is tuned for a batch run. Importing PyTorch, transformers and the
converter allocates ~330k long-lived objects, and the default first threshold (a collection
every 700 net allocations) walks them again and again while they load (0.4-0.6 s per process
on 2 cores); the interpreter's own collections at exit walk them all once more (~1.1 s after a
demo-model ``score``). So a collection runs every 100k net allocations instead (cyclic garbage
is still collected, in larger batches), and the objects alive when the work is done are frozen
(``gc.freeze``) before the interpreter exits: every output is complete and closed by then.
Tests call ``main`` itself and keep Python's defaults.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

GEN0 = 100_000  # net allocations between collections of the youngest generation (Python: 700)


def run_process(main: Callable[[], int]) -> int:
    """``main()``'s exit code, run as a whole process (the collector tuned, see above)."""
    gc.set_threshold(GEN0, *gc.get_threshold()[1:])
    code = main()
    gc.freeze()  # (only the exit follows: nothing left to collect that matters)
    return code
