"""Fixtures for the eval tests.

`answering_gateway` stands in for the gateway's client (the edge of the
evals app) and answers each prompt from a table, so a suite's score is
known in advance; the admin's runs reach it over the serving process's
API in process, as the worker's requests do.
"""
from __future__ import annotations

import pytest

from chatapp import runtime
from gateway import client as gateway_client
from gateway.types import FinalEvent, TokenEvent, Usage
from tests.conversations.conftest import FakeGateway, fake_gateway, serving_api_in_process  # noqa: F401  (re-exported fixtures)


class AnsweringGateway(FakeGateway):
    """Answers a request with the first answer whose key is in its last message;
    an exception as the answer is raised before the first token (a blocked prompt)."""

    def __init__(self, answers: dict | None = None, default: str = "I do not know."):
        super().__init__()
        self.answers = dict(answers or {})
        self.default = default

    def _answer(self, request) -> str:
        prompt = request.messages[-1]["content"]
        answer = next((a for key, a in self.answers.items() if key in prompt), self.default)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def stream(self, request):
        self.requests.append(request)
        text = self._answer(request)
        yield TokenEvent(text)
        yield FinalEvent("stop", Usage(prompt_tokens=5, completion_tokens=len(text.split())), "small")

    def complete(self, request):
        self.requests.append(request)
        text = self._answer(request)
        return text, FinalEvent("stop", Usage(prompt_tokens=5, completion_tokens=len(text.split())), "small")


@pytest.fixture
def answering_gateway(settings, serving_api_in_process):  # noqa: F811
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.EVALS_CONCURRENCY = 2
    with gateway_client.use(AnsweringGateway()) as fake:
        yield fake


@pytest.fixture
def suite_dir(tmp_path, monkeypatch):
    """An empty suites folder in place of the shipped one (write suites into it)."""
    from evals import suites

    monkeypatch.setattr(suites, "DATA_DIR", tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _close_thread_connections():
    """The gateway's database threads keep their connections; close them so
    the test database can be flushed and dropped (asgiref's sync thread:
    tests/conftest.py)."""
    yield
    runtime.close_db_threads()
