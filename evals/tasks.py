"""The admin's eval runs, on the Celery worker.

The worker holds no model (chatapp.celery): like titles and summaries
(conversations.tasks), the run's requests and its embeddings go to the
serving process's /v1 API with the internal credential. A run is not
retried: what it measured is saved item by item, and one that fails says
why on its admin page.
"""
from __future__ import annotations

import logging

from celery import shared_task
from django.db import transaction

from evals import services
from evals.callers import ServingApiCaller
from evals.models import EvalRun

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def run_eval(run_id: int) -> None:
    # Claimed in one UPDATE: a redelivered message finds the run started and does nothing.
    if not EvalRun.objects.filter(pk=run_id, status=EvalRun.Status.QUEUED).update(status=EvalRun.Status.RUNNING):
        return
    services.run_execute(run=EvalRun.objects.get(pk=run_id), caller=ServingApiCaller())


def enqueue(run: EvalRun) -> None:
    """Start the run on the worker once the transaction that created it commits."""
    def send():
        try:
            run_eval.delay(run.pk)
        except Exception as exc:  # a broker outage: the run says so instead of staying queued
            log.exception("enqueueing eval run %s", run.pk)
            EvalRun.objects.filter(pk=run.pk).update(status=EvalRun.Status.FAILED,
                                                     error=f"could not reach the task queue: {exc}")
    transaction.on_commit(send)
