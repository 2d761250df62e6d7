"""A full disk under METRICS_DIR costs metric values, never the process.

prometheus-client grows its memory-mapped value files with truncate and
writes through the map; on a full disk the kernel answers that write with
SIGBUS, which kills the process outright (it took `serve` down in the
disk-full fault test). Each case runs in a child process on a small tmpfs
(root only; skipped elsewhere), so a regression kills the child, not pytest."""
import signal
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys
    from django.conf import settings
    settings.configure(METRICS_ENABLED=True, METRICS_DIR=sys.argv[1])
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess as mp, values
    from observability import multiprocess
    library_file = values.MmapedDict
    multiprocess.use_files()
    if sys.argv[2] == "library":
        values.MmapedDict = library_file
    counter = Counter("chatapp_probe_total", "a probe", ["name"])
    counter.labels("before").inc()
    with open(sys.argv[1] + "/filler", "wb", buffering=0) as filler:
        chunk = b"\\0" * 65536
        while len(chunk) >= 512:
            try:
                filler.write(chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
    for i in range(20000):  # enough new keys to outgrow the file's first MiB
        counter.labels(f"label-{i:05d}-" + "x" * 80).inc()
    counter.labels("before").inc()
    # A metric type whose file does not exist yet: no room to create it, so
    # its values stay in this process's memory (and no empty file is left
    # for /metrics to choke on).
    Gauge("chatapp_probe_gauge", "a probe", multiprocess_mode="all").set(3)
    registry = CollectorRegistry()
    mp.MultiProcessCollector(registry, path=sys.argv[1])
    text = generate_latest(registry).decode()
    assert 'chatapp_probe_total{name="before"} 2.0' in text, text[:500]
    assert "chatapp_probe_gauge" not in text
    kept = text.count("chatapp_probe_total{")
    # Room again: new keys are stored again, no restart needed.
    import os
    os.unlink(sys.argv[1] + "/filler")
    counter.labels("after").inc()
    assert 'chatapp_probe_total{name="after"} 1.0' in generate_latest(registry).decode()
    print("alive", kept)
""")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "metrics"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def run_child(directory, which: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(directory), which],
                          capture_output=True, text=True, timeout=120)


def test_the_library_alone_dies_of_sigbus_on_a_full_disk(small_disk):
    # The premise: without the allocation, the same updates kill the process.
    done = run_child(small_disk, "library")
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr[-2000:])


def test_metric_updates_on_a_full_disk_are_dropped_and_the_process_lives(small_disk):
    done = run_child(small_disk, "ours")
    assert done.returncode == 0, done.stderr[-2000:]
    # The values already in the file kept counting; the new keys past its room were dropped, with a warning.
    kept = int(done.stdout.split()[-1])
    assert 1 <= kept < 20001
    assert "cannot grow" in done.stderr
