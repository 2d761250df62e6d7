"""Chat pages over HTTP: the turn POST, tree edits, conversation management,
rendering safety, search, export, and the cross-user 404 matrix."""
import re
import uuid
from html.parser import HTMLParser

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client

from conversations import services, turns
from conversations.models import Conversation, Message
from tests.conversations.conftest import has_streamed_text, reply_shown_live_or_whole
from tests.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)


def _done(reply, text="Done.", status="complete"):
    services.reply_start(reply_id=reply.id, request_id="r")
    services.reply_finish(reply_id=reply.id, status=status, content=text, stream_seq=2)
    reply.refresh_from_db()
    return reply


@pytest.fixture
def chat(alice, fake_gateway):
    conversation = services.conversation_create(user=alice)
    reply = _done(services.message_send(conversation=conversation, text="First question"), "First **answer**")
    return conversation, reply


async def test_sending_a_message_starts_the_reply_and_returns_the_thread(alice, fake_gateway, fast_streams):
    conversation = await sync_to_async(services.conversation_create)(user=alice)
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post(f"/c/{conversation.id}/send", {"text": "Hello?"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Hello?" in html and reply_shown_live_or_whole(html)
    await turns.wait_idle(10)
    reply = await sync_to_async(Message.objects.get)(conversation=conversation, role="assistant")
    assert (reply.status, reply.content) == ("complete", "Hello, world!")


async def test_new_chat_creates_the_conversation_and_redirects(alice, fake_gateway, fast_streams):
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post("/c/new", {"text": "Plan a trip to Lisbon"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    conversation = await sync_to_async(Conversation.objects.get)(user=alice)
    assert response["HX-Push-Url"] == f"/c/{conversation.id}/" and conversation.title == "Plan a trip to Lisbon"
    # The main pane, the page title and the chat's sidebar entry; not the whole page.
    html = response.content.decode()
    assert response["HX-Retarget"] == "#main" and response["HX-Reswap"] == "innerHTML"
    assert "<title>Plan a trip to Lisbon · Chat</title>" in html
    assert reply_shown_live_or_whole(html)
    entry = re.search(r'<ul hx-swap-oob="afterbegin:#conversation-list"><li><a href="([^"]+)" class="current"', html)
    assert entry and entry.group(1) == f"/c/{conversation.id}/"
    assert "sidebar-footer" not in html and html.count("<li>") == 1
    response = await client.post("/c/new", {"text": "Without htmx"})
    assert response.status_code == 302
    await turns.wait_idle(10)


async def test_the_send_post_prepares_the_model_request_in_its_own_database_trip(alice, fake_gateway, fast_streams,
                                                                                   monkeypatch):
    """The reply's request is built in the POST's own database trip (its task
    does not build it again), and the task moves the reply to streaming beside
    the gateway's admission, before the first token; a context that cannot be
    built still ends as a readable error reply."""
    built = []
    build = turns.build_request
    monkeypatch.setattr(turns, "build_request", lambda **kwargs: built.append(kwargs) or build(**kwargs))
    conversation = await sync_to_async(services.conversation_create)(user=alice)
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    fake_gateway.delay_s = 1.0  # the gateway holds the first token back
    response = await client.post(f"/c/{conversation.id}/send", {"text": "Hello?"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert len(built) == 1  # in the POST's trip
    get_reply = sync_to_async(Message.objects.get)
    # Streaming while the gateway still holds the first token (not a race
    # with the POST: the move runs on the task, beside the admission).
    reply = await eventually(lambda: _streaming(get_reply(conversation=conversation, role="assistant")))
    assert reply.request_id and not reply.content
    await turns.wait_idle(10)
    assert len(built) == 1  # the task used the request the POST built
    chat_request = next(r for r in fake_gateway.requests if r.source == "chat")
    assert chat_request.messages[-1] == {"role": "user", "content": "Hello?"}
    assert chat_request.request_id == reply.request_id

    fake_gateway.delay_s = 0
    fake_gateway.context_window = 10  # nothing fits: the reply says so
    response = await client.post(f"/c/{conversation.id}/send", {"text": "Another question"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    await turns.wait_idle(10)
    reply = await sync_to_async(
        lambda: Message.objects.filter(conversation=conversation, role="assistant").order_by("-created_at").first()
    )()
    assert reply.status == "error" and "too long for the model's context" in reply.error


async def _streaming(reply_coroutine):
    reply = await reply_coroutine
    return reply if reply.status == "streaming" else None


async def test_empty_and_overlong_messages_get_a_clear_inline_error(alice, fake_gateway, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 20
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post("/c/new", {"text": "   "}, headers={"HX-Request": "true"})
    assert response.status_code == 422 and "Write a message" in response.content.decode()
    assert response["HX-Retarget"] == "#composer-error"
    response = await client.post("/c/new", {"text": "x" * 21}, headers={"HX-Request": "true"})
    assert response.status_code == 422 and "limit is 20" in response.content.decode()
    assert not await sync_to_async(Conversation.objects.exists)()
    # A bad option is refused before anything is saved: no empty chat left behind.
    response = await client.post("/c/new", {"text": "Hi", "model": "gpt-17"}, headers={"HX-Request": "true"})
    assert response.status_code == 422 and "Unknown model" in response.content.decode()
    response = await client.post("/c/new", {"text": "Hi", "system_prompt": "y" * 21}, headers={"HX-Request": "true"})
    assert response.status_code == 422 and "system prompt is too long" in response.content.decode()
    assert not await sync_to_async(Conversation.objects.exists)()


def test_the_page_shows_the_current_branch_with_switches(alice_client, chat):
    conversation, reply = chat
    _done(services.message_regenerate(message=reply), "Second answer")
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert "Second answer" in html and "First <strong>answer</strong>" not in html
    assert "2/2" in html and f"/m/{reply.id}/switch" in html
    html = alice_client.post(f"/m/{reply.id}/switch").content.decode()
    assert "First <strong>answer</strong>" in html and "1/2" in html


async def test_edit_and_regenerate_start_new_replies(alice, chat, fast_streams):
    conversation, reply = chat
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post(f"/m/{reply.parent_id}/edit", {"text": "Edited question"})
    assert response.status_code == 200 and "Edited question" in response.content.decode()
    await turns.wait_idle(10)
    response = await client.post(f"/m/{reply.id}/regenerate")
    assert response.status_code == 200
    await turns.wait_idle(10)
    assert await sync_to_async(Message.objects.filter(conversation=conversation, role="assistant").count)() == 3


def test_sidebar_lists_newest_first_and_highlights_the_current_one(alice_client, alice, chat, settings):
    conversation, _ = chat
    newer = services.conversation_create(user=alice)
    _done(services.message_send(conversation=newer, text="Newer chat"))
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    html = html[html.index('id="conversation-list"'):]
    assert html.index("Newer chat") < html.index("First question")
    assert 'aria-current="page"' in html
    settings.CHAT_PAGE_SIZE = 1
    html = alice_client.get("/").content.decode()
    assert "Show more" in html
    assert "First question" in alice_client.get("/c/sidebar?page=2").content.decode()


def test_rename_archive_unarchive_and_delete(alice_client, chat):
    conversation, _ = chat
    assert alice_client.post(f"/c/{conversation.id}/rename", {"title": "Renamed"}).status_code == 302
    assert alice_client.post(f"/c/{conversation.id}/rename", {"title": "  "}).status_code == 422
    alice_client.post(f"/c/{conversation.id}/archive", {"archived": "1"})
    conversation.refresh_from_db()
    assert conversation.title == "Renamed" and conversation.archived
    assert "Renamed" in alice_client.get("/c/archived/").content.decode()
    alice_client.post(f"/c/{conversation.id}/archive", {"archived": "0"})
    conversation.refresh_from_db()
    assert not conversation.archived
    confirm = alice_client.get(f"/c/{conversation.id}/delete")
    assert confirm.status_code == 200 and "for good" in confirm.content.decode()
    assert alice_client.post(f"/c/{conversation.id}/delete").status_code == 302
    assert not Conversation.objects.exists()


def test_conversation_settings_choose_model_and_system_prompt(alice_client, chat):
    conversation, _ = chat
    alice_client.post(f"/c/{conversation.id}/settings", {"model": "small", "system_prompt": "Be brief."})
    conversation.refresh_from_db()
    assert (conversation.model, conversation.system_prompt) == ("small", "Be brief.")
    assert alice_client.post(f"/c/{conversation.id}/settings", {"model": "nope"}).status_code == 422


def test_custom_instructions_are_saved(alice_client, alice):
    assert alice_client.post("/c/preferences/", {"custom_instructions": "I am a chemist."}).status_code == 200
    assert alice.chat_preferences.custom_instructions == "I am a chemist."


XSS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "<a href='javascript:alert(1)'>x</a>",
    "![x](javascript:alert(1))",
    "<svg onload=alert(1)>",
    "```html\n<script>alert(1)</script>\n```",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.parametrize("payload", XSS)
def test_markdown_is_rendered_then_sanitized(alice_client, alice, fake_gateway, payload):
    conversation = services.conversation_create(user=alice)
    reply = _done(services.message_send(conversation=conversation, text="hi"), "Look: " + payload)
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    start = html.index(f'id="m-{reply.id}"')
    parser = _Tags()
    parser.feed(html[start:html.index("</article>", start)])
    for tag, attrs in parser.tags:
        assert tag not in ("script", "svg", "iframe", "object"), tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in ("href", "src"):
                assert not (value or "").strip().lower().startswith(("javascript:", "data:", "vbscript:")), value


def test_markdown_code_is_highlighted(alice_client, alice, fake_gateway):
    conversation = services.conversation_create(user=alice)
    _done(services.message_send(conversation=conversation, text="hi"), "```python\nprint('x')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert '<span class="nb">print</span>' in html and "<table>" in html


def test_search_finds_titles_and_message_content_with_snippets(alice_client, alice, bob, fake_gateway):
    c = services.conversation_create(user=alice)
    _done(services.message_send(conversation=c, text="Tell me about volcanoes"), "Volcanoes erupt when <b>magma</b> rises.")
    services.conversation_update(conversation=c, title="Geology homework")
    other = services.conversation_create(user=bob)
    _done(services.message_send(conversation=other, text="bob's volcanoes secret"))
    html = alice_client.get("/c/search/?q=magma").content.decode()
    assert "Geology homework" in html and "<mark>magma</mark>" in html
    assert "<b>" not in html  # the snippet is escaped; only matches are marked
    assert "Geology homework" in alice_client.get("/c/search/?q=geology").content.decode()
    assert "secret" not in alice_client.get("/c/search/?q=volcanoes").content.decode()
    assert "Nothing matches" in alice_client.get("/c/search/?q=zebra").content.decode()


def test_export_markdown_and_json(alice_client, chat):
    conversation, reply = chat
    md = alice_client.get(f"/c/{conversation.id}/export.md")
    assert md["Content-Type"].startswith("text/markdown") and "attachment" in md["Content-Disposition"]
    body = md.content.decode()
    assert "## You\n\nFirst question" in body and "First **answer**" in body
    data = alice_client.get(f"/c/{conversation.id}/export.json").json()
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["current_branch"] == [str(reply.parent_id), str(reply.id)]
    assert alice_client.get(f"/c/{conversation.id}/export.exe").status_code == 404


async def test_stop_endpoint_stops_and_answers_after_saving(alice, fake_gateway, fast_streams):
    fake_gateway.script = ["x "] * 500
    fake_gateway.delay_s = 0.01
    conversation = await sync_to_async(services.conversation_create)(user=alice)
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    await client.post(f"/c/{conversation.id}/send", {"text": "go"})
    reply = await sync_to_async(Message.objects.get)(conversation=conversation, role="assistant")
    await eventually(lambda: has_streamed_text(reply.id))
    response = await client.post(f"/m/{reply.id}/stop")
    assert response.json() == {"status": "stopped"}
    await sync_to_async(reply.refresh_from_db)()
    assert reply.status == "stopped" and reply.content.startswith("x ")


def test_csrf_is_required_on_posts(alice, chat):
    conversation, reply = chat
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    for url in [f"/c/{conversation.id}/rename", f"/c/{conversation.id}/delete", f"/m/{reply.id}/stop", "/c/new"]:
        assert client.post(url, {"title": "x", "text": "x"}).status_code == 403, url


def test_anonymous_users_are_sent_to_login(client, chat):
    conversation, _ = chat
    assert client.get(f"/c/{conversation.id}/").status_code == 302
    assert client.get("/").status_code == 302


# ------------------------------------------------------------ cross-user matrix

def _endpoints(conversation, reply):
    c, m, u = conversation.id, reply.id, reply.parent_id
    return [
        ("get", f"/c/{c}/", {}),
        ("post", f"/c/{c}/send", {"text": "hi"}),
        ("post", f"/c/{c}/rename", {"title": "pwned"}),
        ("post", f"/c/{c}/settings", {"system_prompt": "pwned"}),
        ("post", f"/c/{c}/archive", {"archived": "1"}),
        ("get", f"/c/{c}/delete", {}),
        ("post", f"/c/{c}/delete", {}),
        ("get", f"/c/{c}/export.md", {}),
        ("get", f"/c/{c}/export.json", {}),
        ("post", f"/m/{u}/edit", {"text": "pwned"}),
        ("post", f"/m/{m}/regenerate", {}),
        ("post", f"/m/{m}/stop", {}),
        ("post", f"/m/{m}/switch", {}),
    ]


def test_every_endpoint_answers_404_to_another_user(bob_client, chat):
    conversation, reply = chat
    for method, url, data in _endpoints(conversation, reply):
        response = getattr(bob_client, method)(url, data)
        assert response.status_code == 404, (method, url, response.status_code)
    conversation.refresh_from_db()
    assert conversation.title != "pwned" and not conversation.archived and conversation.system_prompt == ""
    assert Message.objects.filter(conversation=conversation).count() == 2
    # Unknown ids look the same as foreign ones.
    assert bob_client.get(f"/c/{uuid.uuid4()}/").status_code == 404
    # And the owner still gets through on the same URLs.
    assert bob_client.get("/c/search/?q=First").content.decode().count("First question") == 0
