import pytest
from django.contrib.auth import get_user_model

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery-9"


def signup(client, username, password=PASSWORD):
    return client.post(
        "/accounts/signup/", {"username": username, "password1": password, "password2": password}
    )


@pytest.fixture
def loopback_serve():
    """As `serve` bound to 127.0.0.1: the first sign-up becomes the admin (accounts.setup)."""
    from accounts import setup

    setup.set_first_signup_is_admin(True)
    yield
    setup.set_first_signup_is_admin(False)


def test_first_user_becomes_admin_and_later_users_do_not(client, loopback_serve):
    assert signup(client, "first").status_code == 302
    client.post("/accounts/logout/")
    assert signup(client, "second").status_code == 302
    first, second = (get_user_model().objects.get(username=n) for n in ("first", "second"))
    assert first.is_superuser and first.is_staff
    assert not second.is_superuser and not second.is_staff


def test_signup_logs_the_user_in(client):
    signup(client, "carol")
    page = client.get("/")
    assert page.status_code == 200
    assert b"carol" in page.content


def test_signup_rejects_mismatched_passwords_with_a_clear_error(client):
    response = client.post(
        "/accounts/signup/", {"username": "dave", "password1": PASSWORD, "password2": "other-pass-1"}
    )
    assert response.status_code == 400
    assert b"didn" in response.content  # "The two password fields didn't match."
    assert not get_user_model().objects.filter(username="dave").exists()


def test_signup_rejects_a_taken_username(client, alice):
    response = signup(client, "alice")
    assert response.status_code == 400
    assert b"already exists" in response.content


def test_login_and_logout(client, alice):
    assert client.get("/").status_code == 302  # anonymous: sent to login
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302
    assert client.get("/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/").status_code == 302


def test_login_with_a_wrong_password_fails(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert b"correct username and password" in response.content


def test_change_password(alice_client, alice):
    response = alice_client.post(
        "/accounts/password/",
        {"old_password": "alice-pass-123", "new_password1": PASSWORD, "new_password2": PASSWORD},
    )
    assert response.status_code == 302
    alice.refresh_from_db()
    assert alice.check_password(PASSWORD)


def test_admin_is_reachable_by_the_first_user(client, loopback_serve):
    signup(client, "root")
    assert client.get("/admin/").status_code == 200
