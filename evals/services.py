"""Writes: create an eval run, execute it, record every item's result.

`run_execute` sends a suite's items to a caller (callers.py) a few at a time
(EVALS_CONCURRENCY: the engine batches them, so a suite takes about as long
as its longest few replies instead of their sum), scores each reply on the
calling thread and saves its result as it comes, so the admin shows progress
and an interrupted run keeps what it measured.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from django.conf import settings
from django.db import close_old_connections
from django.db.models import F
from django.utils import timezone

from conversations import services as conversation_services
from conversations import tasks as conversation_tasks
from evals import scorers, suites
from evals.callers import Params, Reply
from evals.models import EvalResult, EvalRun

log = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "You grade answers. Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
    "Criterion: {criterion}\nDoes the answer meet the criterion? Reply with YES or NO only."
)


def run_create(*, suite: str, model: str = "", limit: int | None = None, threshold: float | None = None,
               origin: str = "command", started_by=None) -> EvalRun:
    """A queued run; SuiteError for an unknown or broken suite, ValueError for a bad limit or threshold."""
    loaded = suites.load(suite)
    if limit is not None and limit < 1:
        raise ValueError("The limit must be at least 1.")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError("The threshold must be between 0 and 1.")
    total = len(loaded.items) if limit is None else min(limit, len(loaded.items))
    return EvalRun.objects.create(
        suite=suite, model=(model or "").strip(), limit=limit, origin=origin, started_by=started_by,
        threshold=loaded.threshold if threshold is None else threshold, items_total=total,
    )


def run_execute(*, run: EvalRun, caller) -> EvalRun:
    """Run every item (up to the run's limit) and finish the run; a failure
    marks it failed with the error and keeps the results so far."""
    items = suites.load(run.suite).items[: run.limit or None]
    EvalRun.objects.filter(pk=run.pk).update(status=EvalRun.Status.RUNNING, started_at=timezone.now(),
                                             items_total=len(items), items_done=0)
    try:
        with ThreadPoolExecutor(settings.EVALS_CONCURRENCY, thread_name_prefix="evals") as pool:
            pending = {pool.submit(_ask, caller, item, run.model): item for item in items}
            for future in as_completed(pending):
                item = pending[future]
                reply, latency_s = future.result()
                _record(run, item, reply, latency_s, caller)
    except Exception as exc:
        log.exception("eval run %s failed", run.pk)
        EvalRun.objects.filter(pk=run.pk).update(status=EvalRun.Status.FAILED, error=f"{type(exc).__name__}: {exc}",
                                                 finished_at=timezone.now())
    else:
        _finish(run)
    run.refresh_from_db()
    return run


def _ask(caller, item: dict, model: str) -> tuple[Reply, float]:
    """The item's reply, as the user would see it (titles cleaned up as the job does)."""
    started = time.perf_counter()
    try:
        params = _params(item, model)
        if item["kind"] == "title":
            reply = caller.complete(conversation_tasks.title_messages(item["prompt"]), params)
            title = conversation_services.title_for(reply.text, item["prompt"])
            reply = Reply(title, reply.finish_reason, reply.model, reply.prompt_tokens, reply.completion_tokens,
                          reply.blocked, reply.error, raw_text=reply.text)
        else:
            reply = caller.complete(_messages(item), params)
        return reply, time.perf_counter() - started
    finally:
        close_old_connections()  # this thread's connection, if the caller used the database


def _params(item: dict, model: str) -> Params:
    p = item["params"]
    if item["kind"] == "title":  # the title job's own request
        p = {**p, "max_tokens": conversation_tasks.TITLE_MAX_TOKENS, "temperature": 0.0}
        model = model or conversation_tasks.background_model()
    return Params(model=model or p.get("model") or None, max_tokens=int(p.get("max_tokens", 128)),
                  temperature=float(p.get("temperature", 0.0)), seed=p.get("seed"), stop=tuple(p.get("stop", ())))


def _messages(item: dict) -> list[dict]:
    return item.get("messages") or [{"role": "user", "content": item["prompt"]}]


def _record(run: EvalRun, item: dict, reply: Reply, latency_s: float, caller) -> EvalResult:
    scoring = scorers.Scoring(item=item, embed=caller.embed, judge=_judge(caller))
    values, score, passed = scorers.score(item["checks"], reply, scoring)
    result = EvalResult.objects.create(
        run=run, item_id=item["id"], prompt=item.get("prompt") or _messages(item)[-1]["content"],
        output=reply.text, raw_output=reply.raw_text, finish_reason=reply.finish_reason, model=reply.model, scores=values, score=score,
        passed=passed, latency_s=latency_s, prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens, error=reply.error,
    )
    EvalRun.objects.filter(pk=run.pk).update(items_done=F("items_done") + 1)
    return result


def _judge(caller):
    """The model judge through the configured pool or backend; None (the check
    is skipped) when EVALS_JUDGE_MODEL is unset."""
    def judge(question: str, answer: str, reference: str, criterion: str) -> float | None:
        if not settings.EVALS_JUDGE_MODEL:
            return None
        prompt = JUDGE_PROMPT.format(question=question, reference=reference or "(none)", answer=answer,
                                     criterion=criterion)
        verdict = caller.complete([{"role": "user", "content": prompt}],
                                  Params(model=settings.EVALS_JUDGE_MODEL, max_tokens=3, temperature=0.0))
        if verdict.error:
            raise RuntimeError(f"the judge {settings.EVALS_JUDGE_MODEL!r} failed: {verdict.error}")
        return float(verdict.text.strip().lower().startswith("yes"))
    return judge


def _finish(run: EvalRun) -> None:
    results = list(run.results.all())
    means: dict[str, list[float]] = {}
    for result in results:
        for name, value in result.scores.items():
            if value is not None:
                means.setdefault(name, []).append(value)
    served = sorted({r.model for r in results if r.model})
    EvalRun.objects.filter(pk=run.pk).update(
        status=EvalRun.Status.DONE, finished_at=timezone.now(), served_by=", ".join(served)[:64],
        score=(sum(r.passed for r in results) / len(results)) if results else 0.0,
        scorer_means={name: sum(v) / len(v) for name, v in sorted(means.items())},
    )
