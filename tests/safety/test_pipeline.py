"""The pipeline: checkers chosen by setting, failures and timeouts falling
back per category, verdicts remembered, the judge as a second stage."""
import pytest

from gateway import client as gateway_client
from gateway.types import FinalEvent, TokenEvent, Usage
from safety import pipeline
from safety.services import amoderate_messages, moderate_input
from tests.safety import fakes

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_failing_checker_blocks_its_fail_closed_categories(settings, caplog):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Failing"]
    settings.SAFETY_FAIL_CLOSED = ["hate"]
    decision = pipeline.run(["hello"], source="input")[0]
    assert decision.blocked and decision.top.category == "hate" and decision.top.checker == "failing"
    assert "safety checker failing failed" in caplog.text


def test_a_failing_checker_lets_fail_open_categories_through(settings):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Failing", "safety.checkers.RulesChecker"]
    settings.SAFETY_FAIL_CLOSED = ["blocked_term"]
    settings.SAFETY_BLOCKED_TERMS = ["forbidden"]
    assert not pipeline.run(["hello"], source="input")[0].flagged
    # The other checkers still count.
    assert pipeline.run(["the forbidden word"], source="input")[0].blocked


def test_a_checker_that_times_out_falls_back_per_policy(settings, caplog):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Slow"]
    settings.SAFETY_CHECKER_TIMEOUT_S = 0.05
    settings.SAFETY_FAIL_CLOSED = []
    assert not pipeline.run(["hello"], source="input")[0].flagged
    settings.SAFETY_FAIL_CLOSED = ["violence"]
    decision = pipeline.run(["hello"], source="input")[0]
    assert decision.blocked and "timed out" in decision.top.reason
    assert "timed out" in caplog.text


async def test_the_async_path_falls_back_the_same_way(settings):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Slow", "tests.safety.fakes.Failing"]
    settings.SAFETY_CHECKER_TIMEOUT_S = 0.05
    settings.SAFETY_FAIL_CLOSED = ["violence"]
    verdict = await amoderate_messages([{"role": "user", "content": "hello"}])
    assert verdict.blocked and verdict.category == "violence"
    settings.SAFETY_FAIL_CLOSED = []
    assert not (await amoderate_messages([{"role": "user", "content": "hello again"}])).flagged


def test_verdicts_of_a_text_already_seen_are_remembered(settings):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Counting"]
    fakes.Counting.calls = []
    pipeline.run(["history", "new"], source="input")
    pipeline.run(["history", "newer"], source="input")
    assert fakes.Counting.calls == ["history", "new", "newer"]


def test_a_base64_payload_is_checked_as_the_text_it_hides(settings):
    import base64

    settings.SAFETY_BLOCKED_TERMS = ["forbidden"]
    hidden = base64.b64encode(b"tell me the forbidden thing now").decode()
    assert moderate_input(f"decode this: {hidden}").blocked


class JudgeGateway:
    """The gateway's client, answering the judge's Llama Guard prompt."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    async def stream(self, request):
        self.requests.append(request)
        yield TokenEvent(self.answer)
        yield FinalEvent("stop", Usage(), "guard")


@pytest.mark.parametrize("answer, blocked", [("unsafe\nS1", True), ("safe", False)])
async def test_the_judge_decides_what_the_fast_checkers_only_flagged(settings, answer, blocked):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Flagging"]
    settings.SAFETY_JUDGE_MODEL = "guard"
    with gateway_client.use(JudgeGateway(answer)) as judge_gateway:
        verdict = await amoderate_messages([{"role": "user", "content": "is this ok?"}])
    assert verdict.blocked is blocked
    if blocked:
        assert verdict.category == "violence" and verdict.checker == "judge"
    request = judge_gateway.requests[0]
    assert request.model == "guard" and request.source == "judge"
    assert "is this ok?" in request.messages[0]["content"] and "S1: Violent Crimes" in request.messages[0]["content"]


async def test_no_judge_is_asked_by_default(settings):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Flagging"]
    with gateway_client.use(JudgeGateway("unsafe\nS1")) as judge_gateway:
        verdict = await amoderate_messages([{"role": "user", "content": "is this ok?"}])
    assert not verdict.blocked and judge_gateway.requests == []


def test_a_checker_that_cannot_be_built_fails_per_policy_on_every_call(settings, caplog):
    settings.SAFETY_CHECKERS = ["tests.safety.fakes.Unbuildable", "safety.checkers.NoSuchChecker"]
    settings.SAFETY_FAIL_CLOSED = ["hate"]
    decision = pipeline.run(["hello"], source="input")[0]
    assert decision.blocked and decision.top.category == "hate"
    assert "could not be built" in caplog.text
    settings.SAFETY_FAIL_CLOSED = []
    assert not pipeline.run(["hello"], source="input")[0].flagged


def test_the_first_build_of_the_checkers_freezes_what_it_loaded(settings, monkeypatch):
    """The moderation models live as long as the process: the garbage
    collector's full walks skip them (chatapp.runtime.freeze_long_lived)."""
    import gc

    from safety import pipeline

    monkeypatch.setattr(pipeline, "_checkers", None)
    gc.unfreeze()
    pipeline.checkers()
    assert gc.get_freeze_count() > 0
