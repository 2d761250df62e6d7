import shutil

import pytest

from chatapp import runtime
from django.conf import settings

from chatapp import embedded


def pytest_collection_modifyitems(config, items):
    """Browser tests run last. Playwright's sync API keeps an event loop
    marked running on the main thread for as long as the browser lives (a
    session fixture), and every async test collected after it would then
    fail with "Runner.run() cannot be called from a running event loop"."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(scope="session", autouse=True)
def embedded_services():
    """Redis now; Postgres starts lazily on the first connection. Both are
    stopped at the end: they would otherwise outlive the test run."""
    if settings.EMBEDDED_REDIS:
        embedded.start_redis(settings.EMBEDDED_REDIS_DIR)
    yield
    embedded.stop_configured()
    shutil.rmtree(settings.DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Before the test database is dropped: the chat's and the gateway's
    threads give back their connections and the pool closes them (an open
    pooled connection would keep the database "being accessed")."""
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        runtime.close_db_threads()
        for conn in connections.all():
            if getattr(conn, "pool", None) is not None:
                conn.close_pool()


@pytest.fixture(autouse=True)
def _sync_thread_connection_back():
    """After each test, the connection borrowed on asgiref's single sync thread
    (sync_to_async, the ORM's a-methods, AsyncClient's sync middleware, a
    live server's views) goes back to the pool, as a request's end gives it
    back in a server: Django's test clients take close_old_connections off
    request_finished. Kept, it stayed out of the pool, a test that takes the
    whole pool (test_db_threads) came up one short, and the test database
    could not be dropped at the end."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(autouse=True)
def _clear_cache(request):
    """Each test starts with an empty Redis cache (rate limits, quotas)."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-pass-123")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-pass-123")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def bob_client(alice, bob):
    from django.test import Client

    c = Client()
    c.force_login(bob)
    return c


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the bundled GGUF (cached in MODELS_DIR)."""
    from inference.bootstrap import resolve_model

    return resolve_model("bundled:smollm2", settings.MODELS_DIR)


def tiny_smollm2_engine(smollm2_dir, kv_cache_mb: int = 32, **config):
    """A real Engine on a tiny random-weight Llama with SmolLM2's tokenizer:
    fast on a CPU, real chat template and detokenizer, gibberish text."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from inference import Engine, EngineConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()
    # The native kernels' library from the folder the suite's servers share
    # (tests/env.py), not the engine's default: one build on a fresh machine.
    config.setdefault("kernel_dir", str(settings.ENGINE_KERNEL_DIR))
    return Engine(model, tokenizer, EngineConfig(kv_cache_bytes=kv_cache_mb * 2**20, **config))


@pytest.fixture(scope="session")
def chat_engine(smollm2_dir):
    """A tiny engine registered as the pool "small" (the default chat model)."""
    from chatapp import runtime

    engine = tiny_smollm2_engine(smollm2_dir, model_name="tiny-smollm2")
    runtime.register_engine("small", engine)
    yield engine
    runtime.unregister_engine("small")
    engine.shutdown()


@pytest.fixture
def blocked_signals():
    """Every content_blocked sent during the test, as dicts of its keyword arguments."""
    from safety.signals import content_blocked

    sent = []

    def receiver(sender, **kwargs):
        sent.append(kwargs)

    content_blocked.connect(receiver, weak=False)
    yield sent
    content_blocked.disconnect(receiver)
