"""PostgreSQL backend that starts the embedded cluster on first connection.

Settings point here only when DATABASE_URL is unset. Starting lazily lets
every `manage.py` command (migrate, createsuperuser, shell) work on a fresh
DATA_DIR without `serve`; pgserver stops a cluster that such a command
started when that command exits.
"""
from django.db.backends.postgresql import base

from chatapp import embedded


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self):
        params = super().get_connection_params()
        params["host"] = embedded.postgres_socket_dir(self.settings_dict["EMBEDDED_PGDATA"])
        return params
