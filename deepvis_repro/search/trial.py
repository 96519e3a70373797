"""One trial of the search: the search units optimized under one sampled setting, scored by the
panel on the way (for early stopping) and at the end."""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..optimize import optimize
from .panel import Panel
from .space import to_preset


class TrialRunner:
    """Callable as runner(params, report): optimizes the units with the setting ``params`` stands
    for, calling report(measures) every ``report_every`` steps (the best images so far) and once
    at the end; ``report`` may stop the trial by raising or by not returning (Ray Tune's early
    stopping). Picklable: Ray ships it to the trial's worker once."""

    def __init__(self, backend, judge, panel: Panel, steps: int, report_every: int = 10, seed: int = 0,
                 threads: int | None = None, numerics: str = "default"):
        self.backend, self.judge, self.panel = backend, judge, panel
        self.steps, self.report_every, self.seed = int(steps), max(1, int(report_every)), int(seed)
        self.threads, self.numerics = threads, numerics

    def __call__(self, params: dict, report) -> dict:
        keep_freed_memory()  # in a Ray Tune worker too, as the commands do (allocator.py)
        if self.threads:
            torch.set_num_threads(int(self.threads))
        preset = to_preset(params, self.steps)
        t0 = time.perf_counter()

        def on_best(step, best_x, best):
            done = step + 1
            if done % self.report_every == 0 and done < preset.steps:
                report(self.measure(best_x, best.cpu().numpy(), done, preset.steps, t0))

        r = optimize(self.backend, [str(u) for u in self.panel.units], preset=preset, seed=self.seed,
                     progress=False, on_best=on_best, numerics=self.numerics)
        final = self.measure(r.x, r.best_activation, len(r.history), preset.steps, t0)
        report(final)
        return final

    def measure(self, best_x: torch.Tensor, best: np.ndarray, step: int, steps: int, t0: float) -> dict:
        images = self.backend.deprocess(best_x).reshape(len(best_x), *self.backend.input_size, 3)
        m = self.panel.measure(self.judge, images, np.asarray(best, dtype=np.float64))
        m["units"] = json.dumps(m["units"])  # one column for Ray's result logs, not one per unit
        return {**m, "step": int(step), "steps": int(steps), "finished": step >= steps,
                "seconds": time.perf_counter() - t0}
