from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"

    def ready(self):
        # The safety judge reaches models through the gateway, but safety sits
        # below the gateway in .importlinter's layers and may not import it:
        # the gateway hands its call in (see safety/judge.py).
        from gateway.client import judge_complete
        from safety import judge

        judge.connect(judge_complete)
