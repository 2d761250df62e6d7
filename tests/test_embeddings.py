"""The embedding thread: callers waiting at the same time share one batch."""
import asyncio
import threading

import numpy as np
import pytest

from retrieval import minilm, services
from tests.waiting import eventually

TEXTS = [f"Write a short story about topic {i}." for i in range(8)]


@pytest.fixture
def gated_encode(monkeypatch):
    """`_encode` recording each batch; the first batch waits for `gate`, so
    the callers behind it queue up as they would behind a busy thread. Also
    each text's vector embedded alone, before the patch."""
    real, batches, gate = services._encode, [], threading.Event()
    alone = {text: services.embed([text])[0] for text in TEXTS}
    services.forget()  # else the callers below would get the kept vectors

    def encode(texts):
        batches.append(list(texts))
        if len(batches) == 1:
            assert gate.wait(30), "the gate was never opened"
        return real(texts)

    monkeypatch.setattr(services, "_encode", encode)
    return batches, gate, alone


def _waiting_callers() -> int:
    # The batcher's queue: the one way to know the callers have all arrived.
    with services._batcher._lock:
        return len(services._batcher._waiting)


async def test_concurrent_callers_are_encoded_in_one_batch_and_each_gets_its_own(gated_encode):
    batches, gate, alone = gated_encode
    first = asyncio.create_task(services.aembed(["the busy thread's text"]))
    await eventually(lambda: len(batches) == 1)
    rest = [asyncio.create_task(services.aembed([text])) for text in TEXTS]
    await eventually(lambda: _waiting_callers() == len(TEXTS))
    gate.set()
    vectors = await asyncio.gather(*rest)
    await first
    assert [len(b) for b in batches] == [1, len(TEXTS)]
    fp32 = services.report()["dtype"] == "float32"
    for text, got in zip(TEXTS, vectors):
        assert len(got) == 1
        vector = np.asarray(got[0])
        if fp32:
            assert np.allclose(vector, alone[text], atol=1e-5), text
        else:
            # bf16 ("auto" keeps it where it is faster): on the AMX Xeon a batch
            # and a lone text take other GEMM blockings, and their vectors differ
            # by about 3e-4 a component; they must agree as closely as "auto"
            # asks bf16's to agree with fp32's.
            cosine = vector @ alone[text] / (np.linalg.norm(vector) * np.linalg.norm(alone[text]))
            assert cosine >= minilm.AGREEMENT, (text, cosine)
        # Each caller's own vector: nearer its text's alone than any other text's.
        assert max(TEXTS, key=lambda other: float(vector @ np.asarray(alone[other]))) == text


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_call_works(monkeypatch):
    real, gate, calls = services._encode, threading.Event(), []
    services.forget()

    def encode(texts):
        calls.append(texts)
        if len(calls) == 1:
            assert gate.wait(30)
            return real(texts)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(texts)

    monkeypatch.setattr(services, "_encode", encode)
    busy = asyncio.create_task(services.aembed(["busy"]))
    await eventually(lambda: len(calls) == 1)
    doomed = [asyncio.create_task(services.aembed([text])) for text in TEXTS[:3]]
    await eventually(lambda: _waiting_callers() == 3)
    gate.set()
    await busy
    for task in doomed:
        with pytest.raises(RuntimeError, match="out of memory"):
            await task
    assert len(await services.aembed(["after the failure"])) == 1
    assert services.embed([]) == []


class EngineThread:
    """Stands for a CPU engine lending its thread between steps (inference.lending):
    runs each job it takes on a thread named as engine threads are."""

    def __init__(self):
        self.jobs = []
        self._queue: list = []
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="engine-standin", daemon=True)
        self._thread.start()

    def lend(self, job) -> bool:
        with self._ready:
            self._queue.append(job)
            self._ready.notify()
        return True

    def _serve(self):
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                job = self._queue.pop(0)
            if job.run():
                self.jobs.append(threading.current_thread().name)


@pytest.fixture
def engine_thread(monkeypatch):
    from inference import lending

    registry = lending.Lenders()
    monkeypatch.setattr(lending, "LENDERS", registry)
    standin = EngineThread()
    registry.join(standin.lend)
    return standin


def _cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_batch_runs_on_a_local_engines_thread_and_gets_the_same_vectors(engine_thread, settings):
    texts = ["a reply window about the weather", "a prompt", "x " * 300]  # three lengths: several groups
    settings.EMBEDDING_ENGINE_THREAD_WAIT_MS = 0
    services.forget()
    own = services.embed(texts)
    assert engine_thread.jobs == []  # 0: never lent
    settings.EMBEDDING_ENGINE_THREAD_WAIT_MS = 50
    services.forget()
    lent = services.embed(texts)
    assert engine_thread.jobs and set(engine_thread.jobs) == {"engine-standin"}
    # The engine's team may sum in another order than the embedding thread's one thread.
    assert all(_cosine(a, b) >= minilm.AGREEMENT for a, b in zip(own, lent))


def test_without_a_local_engine_the_embedding_thread_runs_the_batch(settings, monkeypatch):
    from inference import lending

    monkeypatch.setattr(lending, "LENDERS", lending.Lenders())
    settings.EMBEDDING_ENGINE_THREAD_WAIT_MS = 0
    services.forget()
    own = services.embed(["no engine here"])
    settings.EMBEDDING_ENGINE_THREAD_WAIT_MS = 50
    services.forget()
    assert services.embed(["no engine here"]) == own  # the same thread, the same bits
