"""`--budget-usd X`: a spending limit shared by every client of a run.

No new call starts once the spend reaches the limit (the client raises `BudgetExceeded`); calls
already in flight finish and are recorded, so the final spend may pass the limit by what those
calls cost. `Budget.stopped_message()` is the line the CLI prints.
"""

from __future__ import annotations

import threading

from featurescribe.llm.base import BudgetExceeded


class Budget:
    """A spending limit in USD (None: no limit) and what has been spent against it."""

    def __init__(self, limit_usd: float | None = None, spent_usd: float = 0.0):
        if limit_usd is not None and limit_usd < 0:
            raise ValueError("budget must be >= 0")
        self.limit_usd = limit_usd
        self._spent = float(spent_usd)
        self._refused = 0  # calls not started because of the budget
        self._billed = 0  # answers paid for (progress shows them)
        self._lock = threading.Lock()

    @property
    def spent_usd(self) -> float:
        with self._lock:
            return self._spent

    @property
    def refused(self) -> int:
        """How many calls were not started because the budget was spent."""
        with self._lock:
            return self._refused

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self.limit_usd is not None and self._spent >= self.limit_usd

    @property
    def stopped(self) -> bool:
        """True once a call was refused: the run did not do all its work."""
        return self.refused > 0

    @property
    def remaining_usd(self) -> float | None:
        with self._lock:
            return None if self.limit_usd is None else max(0.0, self.limit_usd - self._spent)

    @property
    def billed_calls(self) -> int:
        """How many answers were paid for (`add` calls with calls=1)."""
        with self._lock:
            return self._billed

    def add(self, cost_usd: float, calls: int = 1) -> None:
        with self._lock:
            self._spent += float(cost_usd)
            self._billed += calls

    def check(self) -> None:
        """Raise BudgetExceeded (and count a refusal) when no new call may start."""
        with self._lock:
            if self.limit_usd is not None and self._spent >= self.limit_usd:
                self._refused += 1
                raise BudgetExceeded(self._message())

    def _message(self) -> str:
        return f"stopped at budget ${self.limit_usd:.2f} (spent ${self._spent:.4f})"

    def stopped_message(self) -> str | None:
        """'stopped at budget $X (spent $Y)' once a call was refused, else None."""
        with self._lock:
            if self._refused == 0 or self.limit_usd is None:
                return None
            return self._message() + f"; {self._refused} call(s) not started"

    def summary(self) -> str:
        """One line for the end of a run: the spend, and the limit when there is one."""
        with self._lock:
            if self.limit_usd is None:
                return f"spent ${self._spent:.4f}"
            text = f"spent ${self._spent:.4f} of budget ${self.limit_usd:.2f}"
            if self._refused:
                text = self._message() + f"; {self._refused} call(s) not started"
            return text

    def __repr__(self) -> str:
        return f"Budget(limit_usd={self.limit_usd}, spent_usd={self.spent_usd:.6f})"


def budget_message(budget: Budget | None) -> str | None:
    """The CLI's line when a run stopped at its budget, else None."""
    return budget.stopped_message() if budget is not None else None
