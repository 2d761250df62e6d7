"""Bans: sessions end, API keys stop working, replies in flight are aborted
(a live SSE stream and a live API stream), unban restores; repeated
moderation blocks raise a review flag; a password change revokes API keys."""
import json

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client

from accounts import services
from accounts.models import ReviewFlag
from audit.models import AuditEvent
from conversations import turns
from conversations.models import Message
from gateway.models import ApiKey
from safety.signals import content_blocked
from tests.abuse.conftest import akey_for, key_for
from tests.conversations.conftest import events_of, open_stream, read_stream, text_of

pytestmark = pytest.mark.django_db(transaction=True)

FULL_REPLY_TOKENS = 200  # fake-slow's reply


async def _ban(user, admin=None):
    await sync_to_async(services.user_ban)(user=await sync_to_async(get_user_model().objects.get)(pk=user.pk),
                                           actor=admin)


async def test_a_ban_aborts_a_live_sse_reply_and_ends_the_session(slow_remote, alice, fast_streams):
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post("/c/new", {"text": "count"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    reply = await Message.objects.filter(role="assistant", conversation__user=alice).afirst()
    comm = open_stream(reply.id, user=alice)
    banned = False

    def ban_after_first_token(raw):
        return b"event: token" in raw

    start, raw = await read_stream(comm, stop_after=ban_after_first_token, timeout_s=15)
    assert b"event: token" in raw
    await _ban(alice)
    banned = True
    # The stream goes on from where it was until its terminal event.
    while True:
        message = await comm.receive_output(15)
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    assert banned
    events = events_of(raw)
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "stopped"
    assert len(text_of(raw).split()) < FULL_REPLY_TOKENS
    await turns.wait_idle()
    stored = await Message.objects.aget(pk=reply.pk)
    assert stored.status == "stopped"
    # The session is over: the chat sends the browser to the login page.
    page = await client.get("/")
    assert page.status_code == 302 and "/accounts/login/" in page["Location"]


async def test_a_ban_ends_a_live_api_stream_and_the_key(slow_remote, alice):
    key = await akey_for(alice)
    auth = {"Authorization": f"Bearer {key}"}
    body = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "count"}]})
    response = await AsyncClient().post("/v1/chat/completions", body, content_type="application/json", headers=auth)
    assert response.status_code == 200
    chunks = response.streaming_content
    received = b""
    while b'"content": "tick"' not in received:
        received += await chunks.__anext__()
    await _ban(alice)
    async for chunk in chunks:
        received += chunk
    events = [line[6:] for line in received.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for e in events[:-1] if json.loads(e).get("choices"))
    assert len(text.split()) < FULL_REPLY_TOKENS
    again = await AsyncClient().post("/v1/chat/completions", body, content_type="application/json", headers=auth)
    assert again.status_code == 401


def test_unban_restores_the_account_and_its_keys(transactional_db, alice, admin_client):
    raw = key_for(alice)
    services.user_ban(user=alice)
    assert Client().post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"}).status_code == 200
    services.user_unban(user=alice)
    c = Client()
    assert c.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"}).status_code == 302
    response = Client().get("/v1/models", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200
    kinds = list(AuditEvent.objects.filter(target_user=alice).values_list("kind", flat=True))
    assert "ban" in kinds and "unban" in kinds


def test_the_admin_ban_action_disables_the_user_and_is_audited(transactional_db, alice, admin_client, admin_user):
    response = admin_client.post("/admin/auth/user/", {"action": "ban", "_selected_action": [alice.pk]})
    assert response.status_code == 302
    alice.refresh_from_db()
    assert not alice.is_active
    event = AuditEvent.objects.get(kind="ban")
    assert event.actor == admin_user and event.target_user == alice


def test_repeated_blocks_raise_a_review_flag_visible_in_the_admin(transactional_db, alice, admin_client, settings):
    settings.ABUSE_REVIEW_BLOCKS = 3
    for _ in range(2):
        content_blocked.send(sender=None, user_id=alice.pk, source="input", category="violence",
                             checker="rules", text="x")
    assert not ReviewFlag.objects.exists()
    for _ in range(2):
        content_blocked.send(sender=None, user_id=alice.pk, source="output", category="harassment",
                             checker="rules", text="x")
    flag = ReviewFlag.objects.get(user=alice, resolved_at__isnull=True)
    assert flag.blocks == 4 and set(flag.categories) == {"violence", "harassment"}
    page = admin_client.get("/admin/accounts/reviewflag/?state=open")
    assert page.status_code == 200 and "alice" in page.content.decode()
    users = admin_client.get("/admin/auth/user/?flagged=open").content.decode()
    assert "alice" in users
    assert AuditEvent.objects.filter(kind="review_flag", target_user=alice).count() == 1


@pytest.mark.parametrize("revokes", [True, False])
def test_a_password_change_revokes_api_keys_when_set(transactional_db, alice, settings, revokes):
    settings.PASSWORD_CHANGE_REVOKES_KEYS = revokes
    raw = key_for(alice)
    c = Client()
    c.force_login(alice)
    response = c.post("/accounts/password/", {"old_password": "alice-pass-123", "new_password1": "n3w-Secret-pass!",
                                              "new_password2": "n3w-Secret-pass!"})
    assert response.status_code == 302
    assert ApiKey.objects.filter(user=alice, revoked_at__isnull=False).exists() is revokes
    status = Client().get("/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code
    assert status == (401 if revokes else 200)


@pytest.mark.parametrize("revokes", [True, False])
def test_a_staff_password_change_in_the_admin_revokes_api_keys_when_set(transactional_db, alice, admin_client,
                                                                         settings, revokes):
    settings.PASSWORD_CHANGE_REVOKES_KEYS = revokes
    raw = key_for(alice)
    response = admin_client.post(f"/admin/auth/user/{alice.pk}/password/",
                                 {"usable_password": "true", "password1": "n3w-Secret-pass!",
                                  "password2": "n3w-Secret-pass!"})
    assert response.status_code == 302
    alice.refresh_from_db()
    assert alice.check_password("n3w-Secret-pass!")
    assert ApiKey.objects.filter(user=alice, revoked_at__isnull=False).exists() is revokes
    status = Client().get("/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code
    assert status == (401 if revokes else 200)
