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
        _connect_key_cache()
        _connect_registry()


def _connect_registry() -> None:
    """Any saved or deleted backend, plan, assignment or price reaches every
    process's registry (gateway.registry.changed): the admin, scripts, fixtures."""
    from django.db.models.signals import post_delete, post_save

    from gateway import registry
    from gateway.models import Backend, ModelPrice, Plan, PlanAssignment

    def edited(sender, **kwargs):
        registry.changed()

    for model in (Backend, Plan, PlanAssignment, ModelPrice):
        for signal, verb in ((post_save, "saved"), (post_delete, "deleted")):
            signal.connect(edited, sender=model, dispatch_uid=f"gateway.registry.{model.__name__}.{verb}",
                           weak=False)


def _connect_key_cache() -> None:
    """Whatever ends an API key's validity drops it from the key cache (gateway.keys).
    The receivers are closures: connected with weak=False, or they would be collected."""
    from django.contrib.auth import get_user_model
    from django.db.models.signals import post_delete, post_save

    from gateway.keys import forget, remember_again
    from gateway.models import ApiKey

    def key_saved(sender, instance, **kwargs):
        if instance.revoked_at is not None:
            forget([instance.key_hash])

    def key_deleted(sender, instance, **kwargs):
        forget([instance.key_hash])  # a user's deletion cascades here, key by key

    def user_saved(sender, instance, created=False, update_fields=None, **kwargs):
        if created or (update_fields is not None and "is_active" not in update_fields):
            return  # e.g. last_login, written at every sign-in
        hashes = ApiKey.objects.filter(user_id=instance.pk).values_list("key_hash", flat=True)
        (remember_again if instance.is_active else forget)(hashes)

    post_save.connect(key_saved, sender=ApiKey, dispatch_uid="gateway.keys.saved", weak=False)
    post_delete.connect(key_deleted, sender=ApiKey, dispatch_uid="gateway.keys.deleted", weak=False)
    post_save.connect(user_saved, sender=get_user_model(), dispatch_uid="gateway.keys.user_saved",
                      weak=False)
