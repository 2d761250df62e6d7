"""A restart of PostgreSQL under a running server: every holder of a
connection (the request pool, the sync views' thread, the chat's and the
gateway's own threads) drops a dead one, so the chat page and the API work
again without restarting anything."""
import asyncio
import json
import os
from pathlib import Path
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from django.db import connection, connections, transaction
from django.test import Client
from pgserver._commands import pg_ctl
from psycopg_pool import PoolTimeout

from chatapp import runtime
from conversations import turns
from conversations.models import Conversation, Message
from gateway.keys import api_key_create
from tests.asgi_calls import call

pytestmark = pytest.mark.django_db(transaction=True)

CSRF = "a" * 32  # an unmasked CSRF secret: the cookie and the header must agree


def restart_postgres() -> None:
    """`pg_ctl restart -m fast`, as an operator would: every open connection
    is terminated ("terminating connection due to administrator command")."""
    pgdata = Path(django_settings.DATABASES["default"]["EMBEDDED_PGDATA"])
    user = "pgserver" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "-l", str(pgdata / "restart.log"), "restart"], pgdata=pgdata, user=user, timeout=60)


async def new_chat_through_the_page(session: str, text: str) -> Message:
    from chatapp.asgi import application

    status, content = await call(application, "POST", "/c/new", headers=[
        (b"cookie", f"sessionid={session}; csrftoken={CSRF}".encode()), (b"x-csrftoken", CSRF.encode()),
        (b"hx-request", b"true"), (b"content-type", b"application/x-www-form-urlencoded")],
        body=urlencode({"text": text}).encode())
    assert status == 200, content[-2000:]
    await turns.wait_idle(20)
    return await runtime.on_db_thread(Message.objects.get)(conversation__title=text, role="assistant")


async def completion_through_the_api(key: str) -> dict:
    from chatapp.asgi import application

    body = {"model": "remote", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}
    status, content = await call(application, "POST", "/v1/chat/completions", headers=[
        (b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")],
        body=json.dumps(body).encode())
    assert status == 200, content[-2000:]
    return json.loads(content)


def fill_the_request_pool() -> int:
    """Every connection the pool will open, opened and given back idle (as
    after a busy minute): a restart kills them all."""
    pool = connections["default"].pool
    held = []
    try:
        while len(held) < pool.max_size:
            held.append(pool.getconn(timeout=2))
    except PoolTimeout:
        pass  # the test's own thread holds one
    for conn in held:
        pool.putconn(conn)
    return len(held)


def test_the_chat_page_and_the_api_work_after_a_postgres_restart(alice, remote, settings):
    settings.REPLY_HEARTBEAT_S = 0.5  # the keeper's pass, which replaces the pool's dead connections
    client = Client()
    client.force_login(alice)
    session = client.cookies["sessionid"].value
    key = api_key_create(user=alice, name="restart")[1]

    async def use_everything(text):
        reply = await new_chat_through_the_page(session, text)
        api = await completion_through_the_api(key)
        return reply, api

    # Every holder takes a connection: the pool, the sync views' thread, the
    # chat's and the gateway's threads. The event loop lives on: a server
    # keeps its threads and clients across requests.
    loop = asyncio.new_event_loop()
    try:
        reply, _ = loop.run_until_complete(use_everything("Before the restart"))
        assert (reply.status, reply.content) == ("complete", "echo: Before the restart")

        assert fill_the_request_pool() >= settings.DB_POOL_MAX_SIZE - 1
        restart_postgres()
        # The test's own connection (the fixtures') is the harness's, not the server's.
        connections["default"].close()

        reply, api = loop.run_until_complete(use_everything("After the restart"))
        assert (reply.status, reply.content) == ("complete", "echo: After the restart")
        assert api["choices"][0]["message"]["content"] == "echo: hello there"
        assert Conversation.objects.filter(user=alice).count() == 2
    finally:
        loop.run_until_complete(turns.wait_idle(10))
        pending = asyncio.all_tasks(loop)  # the reply keeper, the stream fan-out
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def _backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@transaction.atomic
def _start_a_chat(user):
    return Conversation.objects.create(user=user, title="in a transaction").id


def test_a_database_thread_retries_a_transaction_once_its_connection_was_killed(alice, settings):
    """A failed `atomic` block reconnects on its way out (to restore
    autocommit), so the thread must judge the connection the job started on,
    not the fresh one it holds by then."""
    runtime.close_db_threads()
    settings.CHAT_DB_THREADS = 1
    try:
        pid = asyncio.run(runtime.on_db_thread(_backend_pid)())
        with connection.cursor() as cursor:  # the test's own connection kills the thread's
            cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])  # waits until it is gone
            assert cursor.fetchone()[0]
        conversation_id = asyncio.run(runtime.on_db_thread(_start_a_chat)(alice))
        assert asyncio.run(runtime.on_db_thread(_backend_pid)()) != pid  # reconnected
    finally:
        runtime.close_db_threads()
    assert Conversation.objects.filter(id=conversation_id).exists()
