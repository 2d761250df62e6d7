"""How serve stops processes it finds (a stale worker, an embedded server):
a process that has exited counts as ended even while its parent has not
reaped it, as a stale worker's parent may never do (a container whose PID 1
reaps nothing)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chatapp import embedded


def orphan_zombie_or_stubborn(ignore_term: bool):
    """A process whose parent (a helper, not this test) never reaps it: the
    helper and the process's pid."""
    child = "import signal, time; " + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else "") + \
        "print('ready', flush=True); time.sleep(600)"
    helper = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    pid = int(helper.stdout.readline())
    assert helper.stdout.readline().strip() == "ready"  # its handler set, if any
    return helper, pid


@pytest.fixture
def helpers():
    started = []
    yield started
    for helper in started:
        embedded.kill_children_of(helper.pid)
        helper.kill()
        helper.wait()


def test_a_zombie_counts_as_ended_and_a_live_process_does_not(helpers):
    helper, pid = orphan_zombie_or_stubborn(ignore_term=False)
    helpers.append(helper)
    proc = psutil.Process(pid)
    assert embedded.wait_ended([proc], timeout_s=0.3) == [proc]  # running
    proc.send_signal(signal.SIGKILL)
    started = time.monotonic()
    # psutil.wait_procs waited the whole timeout here (20 s): the pid lives on as a zombie.
    assert embedded.wait_ended([proc], timeout_s=20) == []
    assert time.monotonic() - started < 10
    assert proc.status() == psutil.STATUS_ZOMBIE


def test_kill_tree_waits_one_grace_for_a_process_that_ignores_sigterm(helpers):
    helper, pid = orphan_zombie_or_stubborn(ignore_term=True)
    helpers.append(helper)
    started = time.monotonic()
    embedded.kill_tree(psutil.Process(pid), signal.SIGTERM, grace_s=5.0)
    took = time.monotonic() - started
    assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, its parent never reaps it
    # The grace after SIGTERM, then SIGKILL: not a second grace waiting on the zombie (10 s before).
    assert 4.9 <= took < 9, took


def test_a_cluster_this_process_stopped_is_not_started_again(tmp_path):
    # A late connection after the test run's teardown (or serve's) used to
    # initdb a fresh cluster in the deleted DATA_DIR and leave it there.
    pgdata = tmp_path / "data" / "pgdata"
    embedded.stop_postgres(pgdata)  # nothing running there: a no-op that still counts
    with pytest.raises(RuntimeError, match="stopped by this process"):
        embedded.postgres_server(pgdata)
    assert not (tmp_path / "data").exists()


def test_a_lock_file_left_by_a_killed_postmaster_is_cleared_and_a_live_ones_kept(tmp_path):
    """A postmaster killed outright leaves postmaster.pid; once its PID is
    reused (a thread of another process, on a busy box), pgserver took the
    cluster as running and the next serve attached to a dead socket."""
    from django.conf import settings

    if not settings.DATABASES["default"].get("EMBEDDED_PGDATA"):
        pytest.skip("an external database (DATABASE_URL): no embedded cluster to compare with")
    live = Path(settings.DATABASES["default"]["EMBEDDED_PGDATA"])  # the suite's own cluster
    embedded.postgres_server(live)  # running (it starts on the first connection)
    assert (live / "postmaster.pid").exists()
    assert embedded.clear_stale_lock(live) is False
    assert (live / "postmaster.pid").exists()
    stale = tmp_path / "pg"
    stale.mkdir()
    record = (live / "postmaster.pid").read_text().split("\n")
    for pid in (os.getpid(), 2**22 + 1):  # a live process that is no postmaster; no process at all
        # Its socket's lock too, which names the same PID (Postgres would not start past it).
        (stale / "postmaster.pid").write_text("\n".join([str(pid), str(stale), record[2], "5432", str(stale),
                                                         *record[5:]]))
        (stale / ".s.PGSQL.5432.lock").write_text(f"{pid}\n{stale}\n")
        assert embedded.clear_stale_lock(stale) is True
        assert not (stale / "postmaster.pid").exists() and not (stale / ".s.PGSQL.5432.lock").exists()
    assert embedded.clear_stale_lock(stale) is False  # no lock file: nothing to do
