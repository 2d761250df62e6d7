"""The disk under DATA_DIR full: a small tmpfs mounted for the test (root
only; skipped elsewhere)."""
import errno
import random
import string
import subprocess

import pytest

from conversations.services import fallback_title
from tests.faults.harness import Serve, User, assert_invariants, wait_for
from tests.test_serve import processes_using

DISK_MB = 256


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk) -> int:
    """Write a file until the disk is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * 2**20
    with open(disk / "filler", "wb", buffering=0) as filler:
        while True:
            try:
                written += filler.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk = chunk[: len(chunk) // 2]
                if len(chunk) < 4096:
                    return written


def write_until_refused(user: User, attempts: int = 40) -> str:
    """Long, incompressible messages until the database cannot store one."""
    rng = random.Random(0)
    for attempt in range(attempts):
        text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(15000))
        response = user.client.post("/c/new", headers={**user._csrf(), "HX-Request": "true"}, data={"text": text})
        if response.status_code >= 400:
            # A sentence for the composer, which keeps the text; never a bare 500.
            assert response.status_code == 503, (response.status_code, response.text[:300])
            assert "nothing was saved" in response.text and response.headers["HX-Retarget"] == "#composer-error"
            return f"message {attempt + 1} refused: HTTP {response.status_code} {response.text[:120]!r}"
    raise AssertionError(f"{attempts} long messages stored on a full disk")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_disk_fails_writes_clearly_and_corrupts_nothing(small_disk, tmp_path):
    data_dir = small_disk / "data"
    serve = Serve(data_dir, log_dir=tmp_path, CHAT_REPLY_MAX_TOKENS="16").start()
    try:
        user = User(serve).sign_up()
        first = "Name three kinds of bread."
        kept_chat, kept_reply = user.new_chat(first)
        assert user.read(kept_reply).terminal["data"]["status"] == "complete"
        # The chat's title comes from the worker after the reply: on a busy box
        # it landed after the snapshot, which then differed by the title alone.
        wait_for(lambda: user.export(kept_chat)["title"] != fallback_title(first), timeout_s=180,
                 what="the kept chat's title")
        kept = user.export(kept_chat)

        redis = serve.redis()
        assert redis.config_get("save") == {"save": "60 1"}  # Redis does save its data
        fill(small_disk)
        redis.bgsave()
        wait_for(lambda: redis.info("persistence")["rdb_last_bgsave_status"] == "err",
                 timeout_s=60, what="Redis to fail a save")
        redis.set("chatapp:faults:probe", "1")  # still accepts writes

        # Chats on the full disk work while Postgres has room in its pages
        # and WAL segment; then a save fails with an error response (the
        # user's message is not half-stored), never a hang.
        refused = write_until_refused(user)
        print(f"measured: full disk: {refused}")
        assert user.export(kept_chat) == kept

        (small_disk / "filler").unlink()
        assert_invariants(user, serve, kept_chat, typed=first)
        kept = user.export(kept_chat)
        fill(small_disk)  # full again for the shutdown: Redis cannot save its dump
    finally:
        code = serve.stop()
    leftovers = processes_using(data_dir)
    assert leftovers == [], [p.cmdline() for p in leftovers]
    (small_disk / "filler").unlink()
    assert code == 0, serve.output()[-3000:]
    # Nothing stored was corrupted: a fresh start finds the chat as it was.
    restarted = Serve(data_dir, log_dir=tmp_path, load_models=False, worker=False).start()
    try:
        assert user.via(restarted).export(kept_chat) == kept
    finally:
        restarted.stop()
