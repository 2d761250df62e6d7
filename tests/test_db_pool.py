"""The request pool's check of the connections it lends (chatapp.db_pool):
no round trip for a healthy idle connection, a dead one never lent."""
import time

import psycopg
import pytest
from django.db import connection
from psycopg_pool import ConnectionPool

from chatapp.db_pool import check_lent_connection

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def round_trips(monkeypatch):
    """The connections psycopg_pool's own check (its round trip) was run on."""
    seen = []
    real = ConnectionPool.check_connection

    def check_connection(conn):
        seen.append(conn)
        real(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(check_connection))
    return seen


def _params() -> dict:
    params = connection.get_connection_params()
    params.pop("pool", None)
    return params


def _connect() -> psycopg.Connection:
    return psycopg.connect(**_params(), autocommit=True)


def _terminate(backend_pid: int) -> None:
    """End a connection from the server's side, as a restart does, and wait until it is gone."""
    with _connect() as other:
        assert other.execute("SELECT pg_terminate_backend(%s, 5000)", [backend_pid]).fetchone()[0]


def test_a_healthy_idle_connection_is_lent_without_a_round_trip(round_trips):
    with _connect() as conn:
        conn.execute("SELECT 1").fetchone()
        check_lent_connection(conn)
        assert round_trips == []
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_a_connection_the_server_ended_is_refused(round_trips):
    with _connect() as conn:
        _terminate(conn.info.backend_pid)
        with pytest.raises(psycopg.OperationalError):
            check_lent_connection(conn)
        assert round_trips == [conn]


def test_a_closed_connection_is_refused_without_touching_its_socket(round_trips):
    conn = _connect()
    conn.close()
    with pytest.raises(ConnectionError):
        check_lent_connection(conn)
    assert round_trips == []


def test_a_harmless_message_costs_a_round_trip_and_keeps_the_connection(round_trips):
    """Something the server sent unasked that does not end the connection
    (here a notification) is read by the round trip; the connection is lent."""
    with _connect() as conn, _connect() as other:
        conn.execute("LISTEN db_pool_probe")
        other.execute("NOTIFY db_pool_probe")
        other.execute("SELECT 1")  # the notification is on its way once NOTIFY's transaction committed
        for _ in range(500):  # the notification reaches the socket soon after NOTIFY's commit
            check_lent_connection(conn)
            if round_trips:
                break
            time.sleep(0.01)
        assert round_trips == [conn]
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_the_pool_replaces_a_connection_that_died_while_idle(round_trips):
    """What a database restart leaves in the pool: the loan after it gets a
    working connection, not the dead one."""
    with ConnectionPool(kwargs={**_params(), "autocommit": True}, min_size=1, max_size=1,
                        check=check_lent_connection, open=True) as pool:
        with pool.connection(timeout=30) as conn:
            dead_pid = conn.info.backend_pid
        _terminate(dead_pid)
        with pool.connection(timeout=30) as conn:
            assert conn.info.backend_pid != dead_pid
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_request_pool_lends_with_this_check():
    pool = connection.pool
    assert pool is not None
    assert pool._check is check_lent_connection
