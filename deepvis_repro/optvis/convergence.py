"""When a unit's optimization has converged: the atlas's fast mode stops it there instead of
running the setting's fixed length (paper_3's 1,000 steps).

The criterion is on the best objective so far, b(t) (the value the kept image reaches): every
``every`` steps from ``min_steps`` on, a unit stops when

    b(t) - b(t - window) < rel_tol * |b(t)|

i.e. the last ``window`` steps gained less than ``rel_tol`` of what it has. The best-so-far is
monotone, so blur's 4-step saw-tooth (paper_3 blurs every 4th step) does not trigger it; checking
on a grid of steps keeps the decision the same whatever batch the unit ran in. With the paper's
constant learning rate the objective keeps creeping up for the whole run (fc units reach 90% of
their 1,000-step value at steps 177-565, measured); what the stop gives up is measured with the
harness's paired statistics (README, "Every unit's optimized image"). The four numbers are the
command's ``optimize.convergence.*`` options; what other values save and cost, measured from full
runs: benchmarks/bench_convergence.py (README, "The fast mode's stop, chosen")."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import DeepvisError


def criterion_words(c: dict) -> str:
    """A recorded criterion (``Convergence.describe()``, as results.json keeps it) in the words the
    command's last line and an atlas's refusal use: one wording, so the two never disagree."""
    return (f"under {100 * float(c.get('rel_tol', 0)):g}% gained over {c.get('window')} steps, "
            f"from step {c.get('min_steps')}")


@dataclass(frozen=True)
class Convergence:
    window: int = 50
    rel_tol: float = 0.02
    min_steps: int = 150
    every: int = 25

    def __post_init__(self):
        if self.window < 1 or self.every < 1 or self.min_steps < self.window:
            raise DeepvisError(f"convergence: window and every must be >= 1 and min_steps >= window, got "
                               f"window {self.window}, every {self.every}, min_steps {self.min_steps}")
        if not 0 <= self.rel_tol < 1:
            raise DeepvisError(f"convergence: rel_tol must be in [0, 1), got {self.rel_tol}")

    def describe(self) -> dict:
        return asdict(self)

    def due(self, steps_done: int) -> bool:
        """Whether the check runs after ``steps_done`` steps."""
        return steps_done >= self.min_steps and steps_done % self.every == 0

    def converged(self, best_now: torch.Tensor, best_then: torch.Tensor) -> torch.Tensor:
        """(N,) bool: gained less than rel_tol of |best_now| since ``window`` steps ago (a unit
        with no finite value yet has not converged; the optimizer stops those for their own reason)."""
        gain = best_now - best_then
        ok = torch.isfinite(best_now) & torch.isfinite(best_then)
        return ok & (gain < self.rel_tol * best_now.abs())
