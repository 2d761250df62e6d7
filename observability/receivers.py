"""Listeners for other apps' signals and Celery's: safety blocks, and the
request id and task outcomes of the worker.

In the top layer with `apps` (it imports safety, which sits above the rest
of observability); connected once, by ObservabilityConfig.ready().
"""
from __future__ import annotations

from celery import signals as celery_signals

from observability import logs, metrics
from safety.signals import content_blocked

TASK_HEADER = "request_id"


def connect() -> None:
    content_blocked.connect(on_content_blocked, dispatch_uid="observability.content_blocked")
    celery_signals.before_task_publish.connect(on_task_publish, dispatch_uid="observability.publish", weak=False)
    celery_signals.task_prerun.connect(on_task_start, dispatch_uid="observability.prerun", weak=False)
    celery_signals.task_postrun.connect(on_task_end, dispatch_uid="observability.postrun", weak=False)
    # The worker's main process once it takes tasks, and each pool process it forks.
    celery_signals.worker_ready.connect(on_worker_process_start, dispatch_uid="observability.ready", weak=False)
    celery_signals.worker_process_init.connect(on_worker_process_start, dispatch_uid="observability.pool",
                                               weak=False)


def on_content_blocked(sender=None, *, category="", checker="", source="", **kwargs) -> None:
    metrics.content_blocked(category=category, checker=checker, source=source)


def on_task_publish(sender=None, headers=None, **kwargs) -> None:
    """The enqueuing request's id travels in the task message's headers."""
    request_id = logs.current_request_id()
    if request_id and headers is not None:
        headers.setdefault(TASK_HEADER, request_id)


def on_task_start(sender=None, task_id=None, task=None, **kwargs) -> None:
    request = task.request
    request_id = getattr(request, TASK_HEADER, None) or (getattr(request, "headers", None) or {}).get(TASK_HEADER)
    if request.is_eager:  # run inline by its caller: the caller's context is the right one
        logs.bind(task=task.name, task_id=task_id)
        return
    logs.clear()  # a worker process runs one task after another: nothing carries over
    logs.bind(request_id=logs.request_id_from(request_id), task=task.name, task_id=task_id)


def on_task_end(sender=None, task=None, state=None, **kwargs) -> None:
    metrics.celery_task(task=task.name, outcome=(state or "unknown").lower())
    if task.request.is_eager:
        logs.unbind("task", "task_id")  # the caller's own fields stay
    else:
        logs.clear()


def on_worker_process_start(sender=None, **kwargs) -> None:
    metrics.celery_worker_process_started()
