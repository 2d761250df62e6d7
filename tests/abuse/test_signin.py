"""Sign-in lockout (django-axes), sign-up policies and throttling, and who
becomes the first admin (loopback bind, setup token)."""
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from accounts import setup
from accounts.models import InviteCode
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db

PASSWORD = "a-Long-pass-4321"


def login(client, username, password, path="/accounts/login/", **extra):
    return client.post(path, {"username": username, "password": password}, **extra)


def signup(client, username, **extra_fields):
    return client.post("/accounts/signup/", {"username": username, "password1": PASSWORD, "password2": PASSWORD,
                                             **extra_fields})


# ------------------------------------------------------------ lockout

def test_repeated_failed_sign_ins_lock_the_account_out_from_that_address(alice, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "alice", "wrong").status_code == 200  # the form's own error
    assert login(client, "alice", "wrong").status_code == 429  # the failure that reaches the limit
    locked = login(client, "alice", "alice-pass-123")  # even the right password now
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.content.decode()
    # Another address is not locked out by this one.
    assert login(Client(REMOTE_ADDR="10.0.0.9"), "alice", "alice-pass-123").status_code == 302
    assert AuditEvent.objects.filter(kind="login_failed", target_name="alice").count() >= settings.AXES_FAILURE_LIMIT
    assert AuditEvent.objects.filter(kind="locked_out").exists()
    assert AuditEvent.objects.filter(kind="login", target_user=alice).exists()


def test_the_admin_login_is_locked_out_too(admin_user, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login(client, "admin", "wrong", path="/admin/login/")
    assert login(client, "admin", "password", path="/admin/login/").status_code == 429


def test_a_request_without_remote_addr_is_counted_not_crashed(alice, settings):
    """Daphne on a unix socket leaves REMOTE_ADDR empty."""
    client = Client(REMOTE_ADDR="")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "alice", "wrong").status_code == 200
    assert login(client, "alice", "wrong").status_code == 429
    assert login(client, "alice", "alice-pass-123").status_code == 429


def test_behind_a_local_proxy_the_forwarded_address_is_the_one_locked_out(alice, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login(Client(), "alice", "wrong", HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert login(Client(), "alice", "alice-pass-123", HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 429
    assert login(Client(), "alice", "alice-pass-123", HTTP_X_FORWARDED_FOR="203.0.113.8").status_code == 302


# ------------------------------------------------------------ sign-up policies

def test_open_sign_up_creates_a_plain_user(not_loopback):
    assert signup(Client(), "first").status_code == 302
    user = get_user_model().objects.get(username="first")
    assert not user.is_staff and not user.is_superuser
    assert AuditEvent.objects.filter(kind="signup", target_user=user).exists()


def test_closed_sign_up_is_refused(settings, not_loopback):
    settings.SIGNUP_POLICY = "closed"
    assert Client().get("/accounts/signup/").status_code == 403
    assert signup(Client(), "someone").status_code == 403
    assert not get_user_model().objects.filter(username="someone").exists()


def test_invite_sign_up_needs_a_valid_code_and_each_code_has_its_uses(settings, not_loopback):
    settings.SIGNUP_POLICY = "invite"
    single = InviteCode.objects.create(max_uses=1)
    double = InviteCode.objects.create(max_uses=2)
    page = Client().get("/accounts/signup/").content.decode()
    assert 'name="invite_code"' in page
    assert signup(Client(), "nocode").status_code == 400
    assert signup(Client(), "badcode", invite_code="nope").status_code == 400
    assert signup(Client(), "one", invite_code=single.code).status_code == 302
    refused = signup(Client(), "two", invite_code=single.code)
    assert refused.status_code == 400 and "not valid" in refused.content.decode()
    assert signup(Client(), "three", invite_code=double.code).status_code == 302
    assert signup(Client(), "four", invite_code=double.code).status_code == 302
    assert signup(Client(), "five", invite_code=double.code).status_code == 400
    assert set(get_user_model().objects.values_list("username", flat=True)) == {"one", "three", "four"}


def test_sign_ups_are_throttled_per_address(settings, not_loopback):
    settings.SIGNUP_RATE_PER_IP = "2/h"
    client = Client()
    assert signup(client, "s1").status_code == 302
    assert signup(Client(), "s2").status_code == 302
    throttled = signup(Client(), "s3")
    assert throttled.status_code == 429 and throttled["Retry-After"]


# ------------------------------------------------------------ the first admin

def test_on_a_public_bind_the_first_sign_up_is_not_the_admin(not_loopback):
    token = setup.configure_for_bind("0.0.0.0")
    assert token
    assert signup(Client(), "eager").status_code == 302
    assert not get_user_model().objects.get(username="eager").is_superuser


def test_on_loopback_the_first_sign_up_is_the_admin(not_loopback):
    assert setup.configure_for_bind("127.0.0.1") is None
    assert signup(Client(), "owner").status_code == 302
    assert signup(Client(), "guest").status_code == 302
    users = get_user_model().objects
    assert users.get(username="owner").is_superuser and not users.get(username="guest").is_superuser


def test_the_setup_token_makes_the_first_admin_once(not_loopback):
    token = setup.configure_for_bind("0.0.0.0")
    form = {"username": "root", "password1": PASSWORD, "password2": PASSWORD}
    wrong = Client().post("/accounts/setup/", {**form, "setup_token": "guess"})
    assert wrong.status_code == 400 and not get_user_model().objects.filter(username="root").exists()
    client = Client()
    response = client.post("/accounts/setup/", {**form, "setup_token": token})
    assert response.status_code == 302 and response["Location"] == "/admin/"
    root = get_user_model().objects.get(username="root")
    assert root.is_superuser and root.is_staff
    assert client.get("/admin/").status_code == 200
    # Used: the page is gone, and a second serve start prints no new token.
    assert Client().get("/accounts/setup/").status_code == 404
    assert setup.configure_for_bind("0.0.0.0") is None
    assert AuditEvent.objects.filter(kind="admin_created", target_user=root).exists()


def test_createsuperuser_still_makes_an_admin(not_loopback, monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", PASSWORD)
    call_command("createsuperuser", "--noinput", "--username", "ops", "--email", "ops@example.com")
    assert get_user_model().objects.get(username="ops").is_superuser
    assert setup.configure_for_bind("0.0.0.0") is None
