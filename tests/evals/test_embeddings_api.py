"""POST /v1/embeddings: the worker holds no model, so an eval run on it
embeds replies for the similarity scorer through the serving process."""
import json

import pytest
from django.test import Client

from gateway.keys import api_key_create, internal_api_key

pytestmark = pytest.mark.django_db


def post(body, token):
    return Client().post("/v1/embeddings", data=json.dumps(body), content_type="application/json",
                         headers={"Authorization": f"Bearer {token}"})


def test_it_returns_one_unit_vector_per_input_in_order():
    response = post({"model": "embedding", "input": ["The capital of France is Paris.", "Paris is in France."]},
                    internal_api_key())
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert [row["index"] for row in data] == [0, 1] and len(data[0]["embedding"]) == 384
    assert sum(x * x for x in data[0]["embedding"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.django_db(transaction=True)  # keys are looked up on the gateway's own database thread
def test_a_users_api_key_works_and_a_single_string_is_one_input(alice):
    _, raw = api_key_create(user=alice, name="k")
    response = post({"input": "hello"}, raw)
    assert response.status_code == 200 and len(response.json()["data"]) == 1


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": [1, 2]}, {"input": ["x"] * 257}, []])
def test_bad_input_is_a_400_in_openais_shape(body):
    response = post(body, internal_api_key())
    assert response.status_code == 400 and "'input' must be" in response.json()["error"]["message"]


def test_no_key_is_a_401():
    assert post({"input": "hello"}, "").status_code == 401
