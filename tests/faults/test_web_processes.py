"""A relay node's web processes (WEB_PROCESSES): several Daphne processes on
one port, started, replaced and stopped by `serve`."""
import json
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.faults.harness import Serve, User, wait_for
from tests.test_serve import ROOT

RULES_ONLY = "safety.checkers.RulesChecker"  # the process layout is under test, not the classifier


@pytest.fixture
def stub_port():
    """bench.sse_stub: an OpenAI-compatible backend streaming a token every 5 ms."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.sse_stub", "--token-ms", "5"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("port "), line
        yield int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(30)


def relay_node(data_dir, stub_port: int, processes: int = 2) -> Serve:
    backend = {"stub": {"base_url": f"http://127.0.0.1:{stub_port}/v1", "model": "stub", "self_hosted": True}}
    return Serve(data_dir, load_models=False, worker=False, WEB_PROCESSES=str(processes), MODEL_POOLS_JSON="{}",
                 GATEWAY_BACKENDS_JSON=json.dumps(backend), SAFETY_CHECKERS=RULES_ONLY)


def web_processes(serve: Serve) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(serve.proc.pid).children():
        try:
            if "serve_web" in proc.cmdline():
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def answering_pids(serve: Serve, connections: int = 40) -> set[int]:
    """The processes that answered /healthz, each call on a new connection."""
    pids = set()
    for _ in range(connections):
        pids.add(httpx.get(f"{serve.url}/healthz", timeout=30).json()["process"]["pid"])
    return pids


def chat_across_connections(user: User, serve: Serve, text: str) -> None:
    """A new chat POSTed on the user's connection and read on a fresh one
    (the kernel may give it to another process): the reply streams whole and
    is stored as streamed."""
    conversation_id, reply_id = user.new_chat(text)
    stream = user.via(serve).read(reply_id, timeout_s=120)
    assert stream.terminal and stream.terminal["data"]["status"] == "complete", stream
    assert stream.text.strip()
    assert user.message(conversation_id, reply_id)["content"] == stream.text


@pytest.mark.timeout(600)
def test_a_relay_nodes_web_processes_share_its_port_are_replaced_and_stop_with_it(tmp_path, stub_port):
    serve = relay_node(tmp_path / "data", stub_port).start()
    try:
        wait_for(lambda: len(web_processes(serve)) == 1, timeout_s=60, what="the second web process")
        first = web_processes(serve)[0]
        wait_for(lambda: answering_pids(serve) == {serve.proc.pid, first.pid}, timeout_s=120,
                 what="both web processes to answer on the port")
        assert httpx.get(f"{serve.url}/healthz", timeout=30).json()["process"]["web_processes"] == 2

        user = User(serve).sign_up()
        for i in range(4):
            chat_across_connections(user, serve, f"Tell me about tides, take {i}.")

        # A web process that dies is replaced; meanwhile the port keeps answering.
        first.kill()
        killed = time.monotonic()
        assert first.pid not in answering_pids(serve, connections=10)  # and no call failed
        wait_for(lambda: [p for p in web_processes(serve) if p.pid != first.pid], timeout_s=90,
                 what="a new web process")
        second = [p for p in web_processes(serve) if p.pid != first.pid][0]
        wait_for(lambda: second.pid in answering_pids(serve), timeout_s=120, what="the new web process to answer")
        print(f"measured: a killed web process replaced and answering {time.monotonic() - killed:.1f} s later")
        chat_across_connections(user, serve, "Tell me about glaciers.")
    finally:
        code = serve.stop()
    assert code == 0, serve.output()[-3000:]
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
    assert "starting it again" in serve.output()


@pytest.mark.timeout(600)
def test_web_processes_go_with_a_killed_serve(tmp_path, stub_port):
    data_dir = tmp_path / "data"
    serve = relay_node(data_dir, stub_port, processes=3).start()
    restarted = None
    try:
        wait_for(lambda: len(web_processes(serve)) == 2, timeout_s=60, what="the extra web processes")
        extra = web_processes(serve)
        serve.kill()
        # The kernel's SIGTERM (PR_SET_PDEATHSIG): nothing keeps the port.
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in extra),
                 timeout_s=60, what="the web processes to exit")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{serve.url}/healthz", timeout=10)
        # The next serve adopts the Postgres and Redis the killed one left, and stops them.
        restarted = relay_node(data_dir, stub_port, processes=3).start()
    finally:
        if restarted is not None:
            assert restarted.stop() == 0, restarted.output()[-3000:]


@pytest.mark.parametrize("other_shares", [False, True], ids=["plain", "reuseport"])
@pytest.mark.timeout(300)
def test_a_relay_node_refuses_a_port_another_server_holds(tmp_path, stub_port, other_shares):
    """Even one whose socket has SO_REUSEPORT too (another relay node, started
    on the same port by mistake): joining it would take half its connections."""
    with socket.socket() as busy:
        if other_shares:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        serve = relay_node(tmp_path / "data", stub_port)
        serve.port = busy.getsockname()[1]
        serve.start_process()
        try:
            code = serve.proc.wait(120)
        except subprocess.TimeoutExpired:
            serve.stop()
            raise AssertionError(f"serve shared a port another server holds:\n{serve.output()[-3000:]}")
    assert code != 0
    assert "could not listen on 127.0.0.1:" in serve.output() and "already in use" in serve.output()
