"""Bad input on the account pages: a clear 400, never a 500. (Sign-up, login
and password forms are Django's, whose fields already refuse NUL characters.)"""
import pytest

pytestmark = pytest.mark.django_db

NUL_TEXT = "before\x00after"


def test_nul_in_an_api_key_name_is_400_and_creates_no_key(alice_client, alice):
    response = alice_client.post("/settings/api-keys/", {"name": NUL_TEXT})
    assert response.status_code == 400 and "NUL" in response.content.decode()
    assert not alice.api_keys.exists()


def test_revoking_a_key_id_beyond_64_bits_is_404(alice_client):
    assert alice_client.post("/settings/api-keys/99999999999999999999999/revoke/").status_code == 404


def test_nul_in_sign_up_or_login_is_a_form_error(client):
    response = client.post("/accounts/signup/", {"username": NUL_TEXT, "password1": "x-Pass-123456",
                                                 "password2": "x-Pass-123456"})
    assert response.status_code == 400
    response = client.post("/accounts/login/", {"username": NUL_TEXT, "password": "whatever"})
    assert response.status_code == 200 and "Null characters are not allowed" in response.content.decode()
