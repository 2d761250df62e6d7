"""A real Celery worker, started with the worker command `serve` uses: the
series it moves show in this (the web) process's /metrics, and when it exits
they follow prometheus-client's multiprocess rules: its counters stay in the
sums, its live gauges stop counting."""
import functools
import os
import signal
import subprocess
import sys
from urllib.parse import quote

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from chatapp.celery import app, exit_with_parent
from tests.env import ROOT
from tests.observability.conftest import ascrape, value
from tests.waiting import eventually

TASK = "dashboard.tasks.rollup"  # a beat job: reads the ledger, writes rollups
TASKS_TOTAL = "chatapp_celery_tasks_total"
PROCESSES = "chatapp_celery_worker_processes"
STARTUP_S = 120  # Django and Celery's start-up in a fresh interpreter, on a busy box


def start_worker() -> subprocess.Popen:
    """serve's worker (`serve._start_worker`) without its beat, on this
    test's database (the worker's own settings would name the non-test one)."""
    params = connection.get_connection_params()
    database_url = (f"postgres://{params['user']}@{quote(params['host'], safe='')}"
                    f"/{connection.settings_dict['NAME']}")
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}  # the same DATA_DIR: METRICS_DIR
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "chatapp", "worker", "--concurrency", "1", "--loglevel", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=functools.partial(exit_with_parent, signal.SIGTERM))


def stop_worker(worker: subprocess.Popen) -> str:
    """What serve does: SIGTERM to the worker's group (Celery's warm shutdown)."""
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
    try:
        output, _ = worker.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        output, _ = worker.communicate()
    return output


async def series(name: str, worker: subprocess.Popen | None = None, **labels) -> float:
    if worker is not None:
        assert worker.poll() is None, f"the worker exited ({worker.returncode})"
    return value(await ascrape(), name, **labels)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
async def test_a_real_workers_series_reach_metrics_and_follow_the_multiprocess_rules_after_it_exits():
    await sync_to_async(app.control.purge)()  # no task another test left in the broker
    done = dict(task=TASK, outcome="success")
    tasks_before, processes_before = await series(TASKS_TOTAL, **done), await series(PROCESSES)
    worker = await sync_to_async(start_worker)()
    try:
        # Its main process once ready, and its one pool process.
        await eventually(lambda: _equals(PROCESSES, processes_before + 2, worker), timeout_s=STARTUP_S, poll_s=0.2)
        await sync_to_async(app.send_task)(TASK)
        await eventually(lambda: _equals(TASKS_TOTAL, tasks_before + 1, worker, **done), timeout_s=60, poll_s=0.2)
    finally:
        output = await sync_to_async(stop_worker)(worker)
    assert worker.returncode == 0, output
    # Gone with the worker: its live gauge (at the first scrape once its pool
    # process is reaped too); kept: its counter, which never goes down.
    await eventually(lambda: _equals(PROCESSES, processes_before), timeout_s=30, poll_s=0.2)
    assert await series(TASKS_TOTAL, **done) == tasks_before + 1


async def _equals(name: str, expected: float, worker: subprocess.Popen | None = None, **labels) -> bool:
    return await series(name, worker, **labels) == expected
