"""A turn's message is embedded once: documents, memory and the semantic
cache share its vector (retrieval.services keeps vectors per text)."""
import asyncio
import threading

import numpy as np
import pytest

from retrieval import services


@pytest.fixture
def encoder(monkeypatch):
    """A stand-in for the model: records each batch; `gate` holds it back."""
    calls, gate = [], threading.Event()
    gate.set()

    def encode(texts):
        assert gate.wait(30)
        calls.append(list(texts))
        if any(t == "boom" for t in texts) and calls.count(["boom"]) == 1:
            raise RuntimeError("the model failed")
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    monkeypatch.setattr(services, "_encode", encode)
    services.forget()
    yield calls, gate
    services.forget()


def test_a_text_is_embedded_once(encoder):
    calls, _ = encoder
    assert services.embed(["hello"]) == services.embed(["hello"]) == [[5.0, 1.0]]
    assert calls == [["hello"]]


def test_a_batch_embeds_only_the_texts_not_kept(encoder):
    calls, _ = encoder
    services.embed(["a"])
    assert services.embed(["a", "bb", "bb"]) == [[1.0, 1.0], [2.0, 1.0], [2.0, 1.0]]
    assert calls == [["a"], ["bb"]]


def test_a_text_being_embedded_is_waited_for_not_embedded_again(encoder):
    calls, gate = encoder
    gate.clear()
    soon = services.embed_soon("question")
    other = []
    waiter = threading.Thread(target=lambda: other.append(services.embed(["question"])))
    waiter.start()
    gate.set()
    waiter.join(30)
    assert soon.result(30).tolist() == other[0][0] == [8.0, 1.0]
    assert asyncio.run(services.aembed(["question"])) == [[8.0, 1.0]]
    assert calls == [["question"]]


def test_a_failure_is_not_kept(encoder):
    calls, _ = encoder
    with pytest.raises(RuntimeError, match="the model failed"):
        services.embed(["boom"])
    assert services.embed(["boom"]) == [[4.0, 1.0]]
    assert calls == [["boom"], ["boom"]]


def test_callers_get_their_own_lists(encoder):
    services.embed(["x"])[0][0] = 99.0
    assert services.embed(["x"]) == [[1.0, 1.0]]


def test_the_kept_vectors_are_bounded(encoder, monkeypatch):
    calls, _ = encoder
    monkeypatch.setattr(services, "EMBEDDING_CACHE_ENTRIES", 2)
    services.embed(["a", "b", "c"])
    services.embed(["a"])  # the oldest went
    assert calls == [["a", "b", "c"], ["a"]]
