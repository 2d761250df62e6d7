"""Reads: a run's previous run of the same suite, and what changed between them."""
from __future__ import annotations

from dataclasses import dataclass

from evals.models import EvalResult, EvalRun


def previous_run(run: EvalRun) -> EvalRun | None:
    """The last finished run of the same suite before this one (any model)."""
    return (EvalRun.objects.filter(suite=run.suite, status=EvalRun.Status.DONE, created_at__lt=run.created_at)
            .exclude(pk=run.pk).order_by("-created_at").first())


def history(suite: str, *, upto: EvalRun | None = None, count: int = 20) -> list[EvalRun]:
    """The suite's last `count` finished runs, oldest first (ending at `upto` when given)."""
    runs = EvalRun.objects.filter(suite=suite, status=EvalRun.Status.DONE)
    if upto is not None:
        runs = runs.filter(created_at__lte=upto.created_at)
    return list(reversed(runs.order_by("-created_at")[:count]))


@dataclass(frozen=True)
class Row:
    name: str
    now: float | None
    before: float | None

    @property
    def delta(self) -> float | None:
        return None if self.now is None or self.before is None else self.now - self.before


@dataclass(frozen=True)
class Comparison:
    run: EvalRun
    previous: EvalRun | None
    rows: list[Row]  # the score first, then each scorer's mean
    fixed: list[str]  # items that failed before and pass now
    broken: list[str]  # items that passed before and fail now


def compare(run: EvalRun) -> Comparison:
    previous = previous_run(run)
    before_means = previous.scorer_means if previous else {}
    rows = [Row("score (items passed)", run.score, previous.score if previous else None)]
    for name in sorted(set(run.scorer_means) | set(before_means)):
        rows.append(Row(name, run.scorer_means.get(name), before_means.get(name)))
    fixed, broken = [], []
    if previous is not None:
        before = dict(EvalResult.objects.filter(run=previous).values_list("item_id", "passed"))
        for item_id, passed in EvalResult.objects.filter(run=run).values_list("item_id", "passed"):
            if item_id in before and before[item_id] != passed:
                (fixed if passed else broken).append(item_id)
    return Comparison(run, previous, rows, sorted(fixed), sorted(broken))
