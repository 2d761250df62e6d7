"""The gateway as its callers see it: one explicit client object.

Chat turns, background tasks and pages reach models only through
`current()`, never through the gateway's modules. Tests replace the object
(`use(fake)`) instead of patching functions, so nothing depends on where or
when a caller imported them.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from gateway import services
from gateway.types import PRIORITY_BACKGROUND, ChatRequest, FinalEvent, ModelInfo, TokenEvent


class GatewayClient:
    def stream(self, request: ChatRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """TokenEvents then one FinalEvent; a GatewayError before the first token."""
        return services.stream_chat(request)

    def abort(self, request_id: str) -> None:
        """Stop a generation of this process within one decoding step (no-op when unknown)."""
        services.abort(request_id)

    def quota_headers(self, request_id: str) -> dict[str, str] | None:
        """The x-ratelimit-* headers of a request being streamed, as its admission
        counted them (its reservation included); None when it reserved nothing."""
        return services.quota_headers(request_id)

    def complete(self, request: ChatRequest) -> tuple[str, FinalEvent]:
        """The whole reply, blocking (sync callers)."""
        return services.complete(request)

    def model_info(self, model: str | None = None) -> ModelInfo:
        return services.model_info(model)

    def count_prompt_tokens(self, messages: list[dict], model: str | None = None) -> int:
        return services.count_prompt_tokens(messages, model)

    def available_models(self, user_id: int | None = None) -> list[str]:
        return services.available_models(user_id)

    def default_model(self) -> str | None:
        """The model of a chat or request that names none; None when no model is configured."""
        return services.default_model()

    def background_model(self) -> str | None:
        """The model of background tasks (titles, summaries, memory)."""
        return services.background_model()

    async def aavailable_models(self, user_id: int | None = None) -> list[str]:
        return await services.aavailable_models(user_id)


_current: GatewayClient = GatewayClient()


def current() -> GatewayClient:
    return _current


@contextmanager
def use(client) -> Iterator:
    """Route every caller to `client` for the duration (tests)."""
    global _current
    previous, _current = _current, client
    try:
        yield client
    finally:
        _current = previous


async def judge_complete(messages: list[dict], model: str) -> str:
    """The safety judge's model call (`safety.judge.connect`, in GatewayConfig.ready):
    through `current()` like every caller, at background priority, ledgered
    as the judge's, with no user's quota; the gateway does not moderate it."""
    request = ChatRequest(messages=messages, model=model, max_tokens=20, temperature=0.0,
                          priority=PRIORITY_BACKGROUND, source=services.JUDGE_SOURCE)
    parts = []
    async for event in current().stream(request):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        elif event.finish_reason == "error":
            raise RuntimeError(event.error or "the judge's model failed")
    return "".join(parts)
