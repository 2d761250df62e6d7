from django.apps import AppConfig

from observability import receivers


class ObservabilityConfig(AppConfig):
    name = "observability"
    verbose_name = "Observability"

    def ready(self):
        receivers.connect()
