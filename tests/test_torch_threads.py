"""The product's own torch threads keep their thread count whatever the engine
does with its own: torch gives a thread its count lazily, from whatever count
the last torch.set_num_threads in any thread left, so a helper thread that only
set its count could take the engine's team size back later, and its second
OpenMP team slowed every engine step 2-3x (docs/BENCHMARKS.md)."""
import threading

import pytest
import torch
from django.conf import settings

from retrieval import services as retrieval_services
from safety import featurizer


# Both model threads: retrieval's embedding thread and moderation's shallow MiniLM thread.
@pytest.mark.parametrize("initializer", [retrieval_services._executor._initializer,
                                         featurizer._shallow_executor._initializer])
def test_a_helper_thread_keeps_its_count_when_the_engine_restores_its_team(initializer):
    ready, engine_done = threading.Event(), threading.Event()
    seen = []

    def helper():
        initializer()
        ready.set()
        engine_done.wait(10)
        seen.append(torch.get_num_threads())  # what its next torch op runs on

    previous = torch.get_num_threads()
    thread = threading.Thread(target=helper)
    thread.start()
    try:
        assert ready.wait(10)
        torch.set_num_threads(settings.EMBEDDING_THREADS + 1)  # as the engine thread does after a one-thread step
    finally:
        engine_done.set()
        thread.join(10)
        torch.set_num_threads(previous)
    assert seen == [settings.EMBEDDING_THREADS]
