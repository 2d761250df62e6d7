"""The audit log's listeners: Django's sign-in signals, django-axes' lockout
and the gateway's API keys (by model label: the audit app imports no app
above it; see .importlinter)."""
from __future__ import annotations

from axes.signals import user_locked_out
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db.models.signals import post_save
from django.dispatch import receiver

from audit.services import Kind, audit_record


@receiver(user_logged_in, dispatch_uid="audit.login")
def on_login(sender, request, user, **kwargs):
    audit_record(kind=Kind.LOGIN, summary=f"{user.get_username()} signed in", actor=user, target_user=user,
                 request=request)


@receiver(user_login_failed, dispatch_uid="audit.login_failed")
def on_login_failed(sender, credentials, request=None, **kwargs):
    # Django has already replaced the password in `credentials` by stars.
    username = str(credentials.get("username", ""))[:150]
    audit_record(kind=Kind.LOGIN_FAILED, summary=f"failed sign-in as {username!r}", target_name=username,
                 request=request)


@receiver(user_locked_out, dispatch_uid="audit.locked_out")
def on_locked_out(sender, request, username=None, ip_address=None, **kwargs):
    audit_record(kind=Kind.LOCKED_OUT, summary=f"sign-in locked out for {username!r}",
                 target_name=str(username or "")[:150], request=request)


@receiver(post_save, sender="gateway.ApiKey", dispatch_uid="audit.api_key")
def on_api_key_saved(sender, instance, created, update_fields=None, **kwargs):
    label = f"{instance.name!r} ({instance.prefix}…)"
    if created:
        audit_record(kind=Kind.API_KEY_CREATED, summary=f"API key {label} created", actor=instance.user,
                     target_user=instance.user, data={"key_id": instance.pk})
    elif instance.revoked_at is not None and "revoked_at" in (update_fields or ()):
        audit_record(kind=Kind.API_KEY_REVOKED, summary=f"API key {label} revoked", target_user=instance.user,
                     data={"key_id": instance.pk})
