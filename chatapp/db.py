"""Database connections of the process's long-lived worker threads."""
from __future__ import annotations


def own_connection(alias: str = "default") -> None:
    """Give the calling thread a connection of its own, outside the pool.

    For the chat's and the gateway's worker threads, which live as long as
    the process and hold one connection each. They must not borrow from the
    request pool: a request keeps its pooled connection (taken by the auth
    lookup) until it ends, while it awaits those workers, so a burst of
    requests larger than the pool would take every connection and then wait
    on workers that wait for one, until DB_POOL_TIMEOUT_S fails them all.
    Call it first thing in the thread, before any query."""
    from django.db import connections

    connection = connections[alias]
    options = connection.settings_dict.get("OPTIONS") or {}
    if "pool" not in options:
        return
    connection.close()  # a connection borrowed before this call goes back
    # This thread's wrapper gets its own settings (the dict is shared by every
    # thread's wrapper of the alias): connect directly, and keep it.
    connection.settings_dict = {
        **connection.settings_dict,
        "OPTIONS": {key: value for key, value in options.items() if key != "pool"},
        "CONN_MAX_AGE": None,
    }
