from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit log"

    def ready(self):
        # The listeners are the audit log's inputs: sign-ins and API keys.
        from audit import receivers  # noqa: F401  (late: models must be loaded first)
