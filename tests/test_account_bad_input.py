"""Bad input on the account pages: a clear 400, never a 500. (Sign-up, login
and password forms are Django's, whose fields already refuse NUL characters.)"""
import pytest

pytestmark = pytest.mark.django_db


def test_nul_in_an_api_key_name_is_400_and_creates_no_key(alice_client, alice):
    response = alice_client.post("/settings/api-keys/", {"name": NUL_TEXT})
    assert response.status_code == 400 and "NUL" in response.content.decode()
    assert not alice.api_keys.exists()
