"""The audit log: what is recorded, that it is append-only, the read-only
admin with its filters, and staff reading a conversation only through the
audited read page."""
import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.utils import DatabaseError
from django.test import Client
from django.utils import timezone

from audit.models import AppendOnlyError, AuditEvent
from conversations import services as chat
from gateway.models import ApiKey, Plan
from safety.signals import content_blocked

pytestmark = pytest.mark.django_db


def kinds():
    return list(AuditEvent.objects.order_by("created_at").values_list("kind", flat=True))


def test_sign_ins_and_failed_sign_ins_are_recorded(alice):
    Client().post("/accounts/login/", {"username": "alice", "password": "nope"})
    Client().post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    failed = AuditEvent.objects.get(kind="login_failed")
    assert failed.target_name == "alice" and failed.ip == "127.0.0.1" and "nope" not in str(failed.data)
    ok = AuditEvent.objects.get(kind="login")
    assert ok.actor == alice and ok.target_user == alice


def test_api_key_creation_and_revocation_are_recorded(alice_client, alice):
    alice_client.post("/settings/api-keys/", {"name": "laptop"})
    key = ApiKey.objects.get(user=alice)
    alice_client.post(f"/settings/api-keys/{key.pk}/revoke/")
    assert kinds() == ["login", "api_key_created", "api_key_revoked"]  # force_login is a sign-in too
    assert all(e.target_user == alice and "laptop" in e.summary
               for e in AuditEvent.objects.filter(kind__startswith="api_key"))


def test_the_admins_revoke_action_is_recorded_per_key(admin_client, alice):
    from gateway.keys import api_key_create

    keys = [api_key_create(user=alice, name=f"k{i}")[0] for i in range(2)]
    admin_client.post("/admin/gateway/apikey/", {"action": "revoke", "_selected_action": [k.pk for k in keys]})
    assert AuditEvent.objects.filter(kind="api_key_revoked").count() == 2


def test_admin_changes_to_backends_and_plans_are_recorded(admin_client, admin_user):
    response = admin_client.post("/admin/gateway/plan/add/", {
        "name": "pro", "tier": "pro", "requests_per_minute": 60, "tokens_per_minute": 1000, "tokens_per_day": 10000,
        "tokens_per_month": 100000, "allowed_models": "", "max_concurrent": 2, "priority": 50,
    })
    assert response.status_code == 302, response.content
    plan = Plan.objects.get(name="pro")
    admin_client.post(f"/admin/gateway/plan/{plan.pk}/delete/", {"post": "yes"})
    admin_client.post("/admin/gateway/backend/add/", {
        "name": "gpu", "kind": "openai", "pool": "", "base_url": "http://gpu:8000/v1", "remote_model": "m",
        "api_key": "sk-secret-value", "context_window": 8192, "fallbacks": "", "enabled": "on", "listed": "on",
    })
    events = list(AuditEvent.objects.filter(kind="admin_change").order_by("created_at"))
    assert [(e.data["model"], e.data["action"]) for e in events] == [
        ("gateway.plan", "added"), ("gateway.plan", "deleted"), ("gateway.backend", "added")]
    assert all(e.actor == admin_user for e in events)
    assert "sk-secret-value" not in str([(e.summary, e.data) for e in events])


def test_moderation_blocks_are_recorded_without_text_unless_asked(alice, settings):
    content_blocked.send(sender=None, user_id=alice.pk, source="input", category="violence",
                         checker="safety.checkers.rules", text="the blocked words")
    event = AuditEvent.objects.get(kind="moderation_block")
    assert event.target_user == alice
    assert event.data == {"source": "input", "category": "violence", "checker": "safety.checkers.rules"}
    settings.AUDIT_STORE_BLOCKED_TEXT = True
    content_blocked.send(sender=None, user_id=None, source="moderations_api", category="self-harm",
                         checker="tox", text="the blocked words")
    stored = AuditEvent.objects.filter(kind="moderation_block").order_by("-created_at").first()
    assert stored.data["text"] == "the blocked words" and stored.target_user is None


def test_the_log_is_append_only_in_the_orm_and_in_the_database(alice):
    Client().post("/accounts/login/", {"username": "alice", "password": "nope"})
    event = AuditEvent.objects.get()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.update(summary="edited")
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()
    with pytest.raises(AppendOnlyError):
        event.delete()
    event.summary = "edited"
    with pytest.raises(AppendOnlyError):
        event.save()
    for sql in ("UPDATE audit_auditevent SET summary = 'x'", "DELETE FROM audit_auditevent"):
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert AuditEvent.objects.get().summary == "failed sign-in as 'alice'"


def test_deleting_a_user_keeps_their_events_by_name(alice):
    Client().post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    get_user_model().objects.filter(pk=alice.pk).delete()
    event = AuditEvent.objects.get(kind="login")
    assert event.actor is None and event.actor_name == "alice" and event.target_name == "alice"


def test_the_admin_shows_the_log_read_only_with_filters(admin_client, alice):
    Client().post("/accounts/login/", {"username": "alice", "password": "nope"})
    Client().post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    listing = admin_client.get("/admin/audit/auditevent/")
    assert listing.status_code == 200 and "failed sign-in" in listing.content.decode()
    for query in ("?kind__exact=login", f"?target_user__id__exact={alice.pk}", "?q=alice",
                  f"?created_at__year={timezone.now().year}", f"?actor__id__exact={alice.pk}"):
        assert admin_client.get("/admin/audit/auditevent/" + query).status_code == 200, query
    only_logins = admin_client.get("/admin/audit/auditevent/?kind__exact=login").content.decode()
    assert "failed sign-in as" not in only_logins
    assert admin_client.get("/admin/audit/auditevent/add/").status_code == 403
    event, count = AuditEvent.objects.first(), AuditEvent.objects.count()
    assert admin_client.post(f"/admin/audit/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.post("/admin/audit/auditevent/", {"action": "delete_selected",
                                                          "_selected_action": [event.pk]}).status_code != 302
    assert AuditEvent.objects.count() == count


# ------------------------------------------------------------ staff reading a conversation

@pytest.fixture
def alice_chat(alice):
    conversation = chat.conversation_create(user=alice, system_prompt="be brief")
    chat.message_send(conversation=conversation, text="my secret plans for the weekend")
    return conversation


def test_lists_and_pages_of_the_admin_never_show_message_text(admin_client, alice_chat):
    pages = ["/admin/conversations/conversation/", f"/admin/conversations/conversation/{alice_chat.pk}/change/",
             "/admin/conversations/message/", "/admin/conversations/message/?q=alice",
             "/admin/conversations/chatpreferences/"]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        assert "secret plans" not in response.content.decode(), page
    message = alice_chat.messages.first()
    detail = admin_client.get(f"/admin/conversations/message/{message.pk}/change/").content.decode()
    assert "secret plans" not in detail
    assert not AuditEvent.objects.filter(kind="conversation_read").exists()


def test_staff_read_a_conversation_only_through_the_audited_read_page(admin_client, admin_user, alice, alice_chat):
    read_url = f"/admin/conversations/conversation/{alice_chat.pk}/read/"
    asked = admin_client.get(read_url).content.decode()
    assert "secret plans" not in asked and 'name="reason"' in asked
    assert "secret plans" not in admin_client.post(read_url, {"reason": ""}).content.decode()
    assert not AuditEvent.objects.filter(kind="conversation_read").exists()
    shown = admin_client.post(read_url, {"reason": "abuse report #12"}).content.decode()
    assert "secret plans" in shown
    event = AuditEvent.objects.get(kind="conversation_read")
    assert event.actor == admin_user and event.target_user == alice
    assert event.data == {"conversation_id": str(alice_chat.pk), "reason": "abuse report #12"}
    # The list's action leads to the same page.
    response = admin_client.post("/admin/conversations/conversation/",
                                 {"action": "read_conversation", "_selected_action": [alice_chat.pk]})
    assert response.status_code == 302 and response["Location"].endswith("/read/")


def test_the_read_page_is_for_staff_only(alice_client, alice_chat):
    response = alice_client.get(f"/admin/conversations/conversation/{alice_chat.pk}/read/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
