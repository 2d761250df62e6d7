"""Django's PostgreSQL backend, with two changes.

- The embedded cluster (settings without DATABASE_URL, EMBEDDED_PGDATA set)
  starts on first connection. Starting lazily lets every `manage.py` command
  (migrate, createsuperuser, shell) work on a fresh DATA_DIR without `serve`;
  pgserver stops a cluster that such a command started when that command exits.
- The request pool checks what it lends with chatapp.db_pool's check (no
  round trip for a healthy idle connection) instead of psycopg_pool's, which
  Django passes when CONN_HEALTH_CHECKS is on and which sends an empty query
  on every loan. Django offers no setting for it (its `check` argument is
  fixed), so the pool is given it once Django has built it.
"""
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool

from chatapp import embedded
from chatapp.db_pool import check_lent_connection


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self):
        params = super().get_connection_params()
        pgdata = self.settings_dict.get("EMBEDDED_PGDATA")
        if pgdata:
            params["host"] = embedded.postgres_socket_dir(pgdata)
        return params

    @property
    def pool(self):
        pool = super().pool
        # psycopg_pool keeps the check it calls on every loan in `_check`
        # (3.1-3.3); tests/test_db_pool.py fails should that change.
        if pool is not None and getattr(pool, "_check", None) is ConnectionPool.check_connection:
            pool._check = check_lent_connection
        return pool
