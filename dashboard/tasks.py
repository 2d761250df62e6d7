"""Celery beat's periodic rollup (CELERY_BEAT_SCHEDULE in settings)."""
import logging

from celery import shared_task

from dashboard import services

log = logging.getLogger(__name__)


@shared_task(name="dashboard.tasks.rollup", ignore_result=True)
def rollup() -> None:
    written = services.rollup_minutes()
    pruned = services.rollup_prune()
    log.debug("dashboard rollup: %d rows written, %d pruned", written, pruned)
