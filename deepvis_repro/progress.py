"""Progress for long work: a tqdm bar on a terminal; in a redirected log (CI, nohup, a file), a
plain line every few seconds instead of a bar's escape codes."""
from __future__ import annotations

import sys
import time


class LineProgress:
    """The part of tqdm's interface the project uses, printed as occasional plain lines."""

    def __init__(self, total=None, desc="", unit="it", initial=0, every: float = 10.0, file=None, **_):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.every = every
        self.file = file or sys.stderr
        self.t0 = time.perf_counter()
        self.start_n = initial
        self.last = self.t0
        self.postfix = ""
        self._line(force=True)

    def _line(self, force=False):
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.n > self.start_n:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and rate > 0:
                left = (self.total - self.n) / rate
                parts.append(f"ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)

    def update(self, n=1):
        self.n += n
        self._line()

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def close(self):
        self._line(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Null:
    n = 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, *a, **k):
        pass

    def set_description(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress(total=None, desc="", unit="it", initial=0, enabled: bool = True, leave: bool = True):
    """A bar on a terminal, plain lines otherwise, nothing when not enabled."""
    if not enabled:
        return _Null()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return LineProgress(total=total, desc=desc, unit=unit, initial=initial)
