"""A worker's pass-end evaluation: the whole test set only where it can decide the run.

Every worker evaluates at every pass end, so with W workers the evaluation's cost per pass
of the run stays the same while the training part shrinks as 1/W. Between decisions a fixed
sample of the test set does (the same images every time, from the run's seed): its accuracy
is the curve's point. The whole test set is evaluated when the sample cannot rule the target
out (its accuracy within ``MARGIN_SE`` standard errors of the target, or above it), at the last
pass, whenever the run ends, and always with early stopping (its decisions need the real
validation loss). So a run never stops on a sample, and a reached target is never missed by
more than the chance of a 3-standard-error miss (one pass late at worst).
"""

from __future__ import annotations

import math

import numpy as np

from emnist.models import Model
from emnist.train.config import TrainConfig
from emnist.train.state import WorkerState

__all__ = ["MARGIN_SE", "SAMPLE_SIZE", "Evaluator"]

SAMPLE_SIZE = 2000  # test images of a quick evaluation (about 1% standard error)
MARGIN_SE = 3.0  # how many standard errors below the target a sample must be to decide nothing


class Evaluator:
    """``evaluate(params, st, now)`` at a pass end; ``final(params, st, now)`` when the run
    ends after a sampled pass."""

    def __init__(self, model: Model, test: tuple[np.ndarray, np.ndarray],
                 calib: np.ndarray | None, cfg: TrainConfig) -> None:
        self.model, self.test, self.calib, self.cfg = model, test, calib, cfg
        self.sample: tuple[np.ndarray, np.ndarray] | None = None
        n = len(test[1])
        if n >= 2 * SAMPLE_SIZE and not cfg.patience:
            rng = np.random.default_rng([cfg.seed, 0x5EED])
            at = np.sort(rng.choice(n, SAMPLE_SIZE, replace=False))
            self.sample = (test[0][at], test[1][at])
        self.sampled = False  # the last evaluation was on the sample only
        self.evaluated = 0  # images the last call evaluated (the simulator charges for them)

    def evaluate(self, params: np.ndarray, st: WorkerState, now: float) -> None:
        last = st.iteration >= self.cfg.iterations
        if self.sample is not None and not last:
            acc, loss = self.model.evaluate(params, *self.sample, calib=self.calib)
            self.evaluated = len(self.sample[1])
            se = math.sqrt(max(acc * (1 - acc), 0.01) / SAMPLE_SIZE)
            if acc + MARGIN_SE * se < self.cfg.target_accuracy:
                self._record(st, acc, loss, now)
                self.sampled = True
                return
            self.evaluated += len(self.test[1])
        else:
            self.evaluated = len(self.test[1])
        acc, loss = self.model.evaluate(params, *self.test, calib=self.calib)
        self._record(st, acc, loss, now)
        self.sampled = False

    def final(self, params: np.ndarray, st: WorkerState, now: float) -> None:
        """The run ends after a sampled pass (a stop signal, the wall clock): its last point
        becomes the whole test set's, and a target reached after all counts."""
        self.evaluated = 0
        if not self.sampled:
            return
        self.evaluated = len(self.test[1])
        st.curve.pop()
        acc, loss = self.model.evaluate(params, *self.test, calib=self.calib)
        self._record(st, acc, loss, now)
        self.sampled = False
        if acc >= self.cfg.target_accuracy and not st.reached:
            st.reached, st.stop_reason = True, "target"

    @staticmethod
    def _record(st: WorkerState, acc: float, loss: float, now: float) -> None:
        st.accuracy, st.val_loss = acc, loss
        st.curve.append([round(now, 4), st.iteration, acc, round(loss, 6), st.samples])
