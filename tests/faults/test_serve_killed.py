"""SIGKILL `serve` in the middle of a reply, then start it again."""
import time

import pytest

from tests.faults.harness import (
    LONG_PROMPT, Serve, User, assert_invariants, celery_processes_of, wait_for,
)


def day_quota_counted(serve: Serve) -> int:
    """The tokens the users' quota counters for today hold."""
    redis = serve.redis()
    return sum(int(redis.get(key) or 0) for key in redis.scan_iter("*gw:q:*:tpd:*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_reply_cut_by_a_killed_serve_ends_interrupted_with_its_text(tmp_path):
    data_dir = tmp_path / "data"
    first = Serve(data_dir, QUOTA_LEASE_S="3").start()
    restarted = None
    try:
        user = User(first).sign_up()
        conversation_id, reply_id = user.new_chat(LONG_PROMPT)
        # Several materializations (every 0.2 s here) into the reply.
        before = user.read(reply_id, until=lambda s: len(s.tokens) >= 20)
        assert before.terminal is None, "the reply ended before the fault"
        worker_pids = [p.pid for p in celery_processes_of(data_dir)]
        assert worker_pids, "serve started no worker"

        first.kill()
        killed = time.monotonic()
        # The worker goes with its serve (PR_SET_PDEATHSIG), pool and beat included.
        wait_for(lambda: not celery_processes_of(data_dir), timeout_s=60, what="the old worker to exit")
        print(f"measured: old worker gone {time.monotonic() - killed:.1f} s after the kill")

        restarting = time.monotonic()
        restarted = Serve(data_dir, QUOTA_LEASE_S="3").start()
        print(f"measured: restart to healthy: {time.monotonic() - restarting:.1f} s")
        user = user.via(restarted)
        # The dead process never settled its reservation: its lease runs out
        # and the new serve gives the reserved worst case back.
        print(f"measured: day quota counter after the kill: {day_quota_counted(restarted)} tokens "
              f"for a reply cut after {len(before.tokens)} tokens")
        wait_for(lambda: day_quota_counted(restarted) == 0, timeout_s=60, what="the reservation to be given back")
        print(f"measured: reservation given back {time.monotonic() - killed:.1f} s after the kill")
        reply = assert_invariants(user, restarted, conversation_id, typed=LONG_PROMPT)
        assert reply["status"] == "interrupted", reply
        # What was stored is all that was streamed: the text after the last
        # materialization comes back from the reply's log in Redis.
        assert reply["content"].startswith(before.text), (reply["content"], before.text)
        print(f"measured: killed mid-reply: {len(before.text)} chars streamed, {len(reply['content'])} stored")
        # One worker, started by the new serve: none left over from the old one.
        workers = restarted.worker_mains()
        assert len(workers) == 1
        assert {p.pid for p in celery_processes_of(data_dir)}.isdisjoint(worker_pids)
    finally:
        code = (restarted or first).stop()
    assert code == 0, restarted.output()[-3000:]
    assert not celery_processes_of(data_dir)
