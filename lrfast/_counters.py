"""The read-only counters every optimizer object reports (the dense classes of lrfast.optim
and the embedding-table classes of lrfast.embedding), written once."""
from __future__ import annotations

from typing import Any


class StepCounters:
    """``step_count``, ``skipped_steps``, ``skip_nonfinite`` and ``last_lr`` from the
    attributes ``_step_count``, ``_skipped``, ``_skip_nonfinite`` and ``_last_lr``."""

    _step_count: int
    _skipped: int
    _skip_nonfinite: bool
    _last_lr: Any

    @property
    def step_count(self) -> int:
        """Updates completed so far."""
        return self._step_count

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN or infinite (``skip_nonfinite=True``)."""
        return self._skipped

    @property
    def skip_nonfinite(self) -> bool:
        return self._skip_nonfinite

    @property
    def last_lr(self):
        """The learning rate used by the last step (None before the first)."""
        return self._last_lr
