"""An engine's step cost, fitted from its own steps, and the jobs per second it can finish with
its slots full: the capacity an autoscaler needs when a job's engine time grows with what runs
beside it (a long prompt's prefill is not shared by the batch; decoding mostly is).

The model is the simulator's (:class:`~breakwater.capacity.service.ServiceCurve`): a step costs
``base + per_seq * running + per_prompt_token * prompt tokens joining``. A worker whose slots stay
full finishes a job of ``o`` output and ``q`` prompt tokens every ``o * (base / slots + per_seq) +
q * per_prompt_token`` seconds of engine time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HALF_LIFE_STEPS = 4000  # recent steps count; a fit from a minute ago at ~50 steps/s half as much
MIN_STEPS = 50.0  # effective (decayed) steps before a fit is trusted
VARIES_SEQS = 0.5  # standard deviations below which a regressor counts as constant
VARIES_TOKENS = 1.0
FULL = 0.9  # a constant batch at this share of the slots counts as a full worker's
REL_SE = 0.1  # the largest standard error of a full batch's extrapolated step, relative to it
_RESCALE = 1e150


@dataclass(frozen=True, slots=True)
class StepCost:
    base_s: float
    per_seq_s: float
    per_prompt_token_s: float

    def job_s(self, slots: int, output_tokens: float, prompt_tokens: float) -> float:
        """Engine seconds one job takes with ``slots`` sequences running beside it."""
        return (
            output_tokens * (self.base_s / max(1, slots) + self.per_seq_s)
            + prompt_tokens * self.per_prompt_token_s
        )

    def jobs_per_s(self, slots: int, output_tokens: float, prompt_tokens: float) -> float:
        """Jobs finished per second with the slots full (0 when the lengths are unknown)."""
        per_job = self.job_s(slots, output_tokens, prompt_tokens)
        return 1.0 / per_job if per_job > 0 else 0.0


class StepFit:
    """Least squares of step time on (1, running, prompt tokens joining), forgetting old steps
    exponentially (``half_life`` steps). ``cost()`` is None until enough steps ran; while a full
    batch's step, extrapolated from the batches seen, is uncertain (``REL_SE``: a few noisy steps
    at 1-3 sequences say little about 32); while the batch size has not varied (unless it stayed
    full: then its decode cost at that batch is known); or when nothing in it takes time. A worker
    then reports no rating and the gateway measures its capacity as before (Little's law). A cost
    that noise pushed below zero counts as zero."""

    def __init__(self, slots: int = 0, half_life: int = HALF_LIFE_STEPS) -> None:
        self.slots = slots  # the engine's sequence slots (0: unknown)
        self._grow = 0.5 ** (-1.0 / half_life)  # newer steps weigh more (rescaled, not decayed)
        self._w = 1.0
        # Weighted sums: n, Σx1, Σx2, Σx1², Σx1x2, Σx2², Σy, Σx1y, Σx2y, Σy² (x1 running, x2 prompt tokens).
        self._s = [0.0] * 10
        self.steps = 0

    def add(self, seconds: float, running: int, prompt_tokens: int) -> None:
        w = self._w = self._w * self._grow
        s = self._s
        s[0] += w
        s[1] += w * running
        s[2] += w * prompt_tokens
        s[3] += w * running * running
        s[4] += w * running * prompt_tokens
        s[5] += w * prompt_tokens * prompt_tokens
        s[6] += w * seconds
        s[7] += w * running * seconds
        s[8] += w * prompt_tokens * seconds
        s[9] += w * seconds * seconds
        self.steps += 1
        if w > _RESCALE:
            self._s = [v / w for v in s]
            self._w = 1.0

    def cost(self) -> StepCost | None:
        n, x1, x2, x11, x12, x22, y, x1y, x2y, yy = (v / self._w for v in self._s)
        if n < MIN_STEPS:  # n: the effective number of steps (the newest weighs 1)
            return None
        m1, m2, my = x1 / n, x2 / n, y / n
        if m1 <= 0:
            return None
        # Centred moments: the intercept drops out.
        c11, c12, c22 = x11 / n - m1 * m1, x12 / n - m1 * m2, x22 / n - m2 * m2
        c1y, c2y, cyy = x1y / n - m1 * my, x2y / n - m2 * my, yy / n - my * my
        batch_varies, prefill_varies = c11 >= VARIES_SEQS**2, c22 >= VARIES_TOKENS**2
        det = c11 * c22 - c12 * c12
        if batch_varies:
            if prefill_varies and det > 1e-3 * c11 * c22:
                per_seq, per_token = (c1y * c22 - c2y * c12) / det, (c2y * c11 - c1y * c12) / det
            else:  # no prefill to tell apart (or always the same): it counts as the step's
                per_seq, per_token = c1y / c11, 0.0
            base = my - per_seq * m1 - per_token * m2
            residual = cyy - per_seq * c1y - per_token * c2y
            if self.slots and not _sure_at(self.slots, n, m1, c11, base + per_seq * self.slots, residual):
                return None
        elif self.slots and m1 >= FULL * self.slots:
            # The batch never changed, and it is (nearly) full: the step's decode cost cannot be
            # split into its fixed and per-sequence parts, but at this batch, what a full worker
            # runs, it is known; counting it all per sequence errs towards more workers.
            per_token = c2y / c22 if prefill_varies else 0.0
            base, per_seq = 0.0, (my - per_token * m2) / m1
        else:  # a batch that never varied, far below the slots: nothing says what a full one costs
            return None
        values = (base, per_seq, per_token)
        if not all(math.isfinite(v) for v in values):
            return None
        # Noise can push a cost that is really ~0 (vLLM's step barely grows with the batch) below it.
        base, per_seq, per_token = (max(0.0, v) for v in values)
        if base + per_seq <= 0:
            return None
        return StepCost(base, per_seq, per_token)


def _sure_at(slots: int, n: float, m1: float, c11: float, full: float, residual: float) -> bool:
    """Whether a full batch's step, extrapolated from the batches seen, is known within
    ``REL_SE`` (its standard error from the residual spread, counting half the weighted steps
    as independent): a few noisy steps at 1-3 sequences say little about 32."""
    if full <= 0:
        return False
    se2 = max(0.0, residual) / (n / 2) * (1 + (slots - m1) ** 2 / c11)
    return se2 <= (REL_SE * full) ** 2


class Rating:
    """What one worker can finish: its fitted step cost and the mean lengths of its recent jobs
    (``alpha``: each finished job's weight in the means)."""

    def __init__(self, slots: int, alpha: float = 0.05) -> None:
        self.slots = slots
        self.fit = StepFit(slots)
        self.alpha = alpha
        self.prompt_tokens = self.output_tokens = 0.0
        self.jobs = 0

    def finished(self, prompt_tokens: int, output_tokens: int) -> None:
        if output_tokens <= 0:  # an embedding (no decode steps): not the jobs the slots run
            return
        if self.jobs == 0:
            self.prompt_tokens, self.output_tokens = float(prompt_tokens), float(output_tokens)
        else:
            a = self.alpha
            self.prompt_tokens += a * (prompt_tokens - self.prompt_tokens)
            self.output_tokens += a * (output_tokens - self.output_tokens)
        self.jobs += 1

    def jobs_per_s(self) -> float | None:
        """Jobs per second with the slots full, for recent jobs' lengths; None before both are known."""
        cost = self.fit.cost() if self.jobs else None
        if cost is None or self.output_tokens <= 0:
            return None
        return cost.jobs_per_s(self.slots, self.output_tokens, self.prompt_tokens)
