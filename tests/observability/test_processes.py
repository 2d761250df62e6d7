"""Series written by other processes (the Celery worker's) appear in the
serving process's /metrics; `serve` clears an earlier run's at start."""
import os
import subprocess
import sys

from observability import multiprocess
from tests.env import ROOT
from tests.observability.conftest import scrape, value

WORKER_LIKE = """
import django
django.setup()
from observability import metrics
metrics.celery_task(task="tests.another_process", outcome="success")
metrics.ingestion_job_finished("ok")
metrics.celery_worker_process_started()  # a live gauge: it goes with the process
"""


def _in_another_process(code: str) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatapp.settings"}  # the same DATA_DIR: the same METRICS_DIR
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_another_processs_series_show_in_this_ones_metrics_until_a_serve_starts():
    before = scrape()
    _in_another_process(WORKER_LIKE)
    after = scrape()
    labels = dict(task="tests.another_process", outcome="success")
    assert value(after, "chatapp_celery_tasks_total", **labels) == value(before, "chatapp_celery_tasks_total",
                                                                         **labels) + 1
    assert value(after, "chatapp_ingestion_jobs_total", outcome="ok") >= 1
    assert value(after, "chatapp_celery_worker_processes") == value(before, "chatapp_celery_worker_processes")
    own = value(after, "chatapp_http_requests_total", view="metrics")
    assert multiprocess.clear_stale_files() >= 1  # what serve does at start
    cleared = scrape()
    assert value(cleared, "chatapp_celery_tasks_total", **labels) == 0
    assert value(cleared, "chatapp_http_requests_total", view="metrics") >= own  # this process's own stay
