"""Where scoring spends its time: wall seconds per phase, and one progress bar for all of them.

:class:`Phases` adds up the seconds of each named phase (``with phases("forward"): ...``) and the
CPU seconds of work done on worker threads (the quantizer sweeps, which overlap the backward
pass); the scores file keeps them (``sensitivity.phases``) and ``bench/speed.py`` reports them.

:class:`Progress` is the one bar a scoring run shows: its unit is a token through a layer
(forward, backward) plus a weight swept (scaled to the same cost), so its ETA covers every phase.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm import tqdm

PHASES = ("hash", "setup", "read", "zd", "forward", "imatrix", "head", "backward", "list",
          "sweeps", "wait")


@dataclass
class Phases:
    """Seconds per phase (wall, on the thread that runs it); ``sweeps`` in CPU seconds over the
    worker threads, ``wait`` the wall time spent waiting for the sweeps after the backward."""

    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _open: threading.local = field(default_factory=threading.local, repr=False)

    @contextmanager
    def __call__(self, name: str):
        """Time a phase; a phase inside another counts for itself, not for the outer one."""
        stack = self._open.__dict__.setdefault("stack", [])
        t0 = time.perf_counter()
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()
            self.inner(name, time.perf_counter() - t0)

    def inner(self, name: str, seconds: float) -> None:
        """``seconds`` of ``name`` spent inside the phase now open on this thread (if any)."""
        stack = self._open.__dict__.get("stack")
        self.add(name, seconds)
        if stack:
            self.add(stack[-1], -seconds)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def thread_cpu(self, name: str):
        """A context that adds the calling thread's CPU seconds to ``name``."""
        phases = self

        @contextmanager
        def ctx():
            t0 = time.thread_time()
            try:
                yield
            finally:
                phases.add(name, time.thread_time() - t0)
        return ctx()

    def report(self) -> dict[str, float]:
        """{phase: seconds (1 decimal)} in :data:`PHASES` order, plus ``total`` (wall)."""
        out = {k: round(self.seconds[k], 1) for k in PHASES if k in self.seconds}
        out["total"] = round(time.perf_counter() - self.started, 1)
        return out


class Progress:
    """One bar over the whole scoring run (units: token-layers; sweeps counted in the same unit
    by their expected cost), so the ETA is for everything left, not for the current phase."""

    def __init__(self, total: float, enabled: bool, desc: str) -> None:
        self.bar = tqdm(total=round(total), desc=desc, unit="tok-layer", unit_scale=True,
                        disable=not enabled, leave=False, smoothing=0.05)
        self._lock = threading.Lock()
        self.desc = desc

    def stage(self, name: str) -> None:
        """Name the phase now running beside the bar (forward, backward, sweeps)."""
        with self._lock:
            self.bar.set_description(f"{self.desc}: {name}")

    def update(self, n: float) -> None:
        with self._lock:
            self.bar.update(round(n))

    def grow(self, n: float) -> None:
        """Add work found later (the sweeps, once the tensor list is known)."""
        with self._lock:
            self.bar.total += round(n)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
