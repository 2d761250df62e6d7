import pytest

pytestmark = pytest.mark.django_db


def test_healthz_reports_database_redis_and_pools(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["database"]["status"] == "ok"
    assert body["redis"]["status"] == "ok"
    assert "small" in body["model_pools"]


def test_healthz_says_which_number_format_minilm_runs_in(client):
    from retrieval import services
    from safety import featurizer

    services.embed(["load the model"])
    featurizer.vectors(["load the shallow pass"], "minilm2")
    embeddings = client.get("/healthz").json()["embeddings"]
    for name in ("retrieval", "moderation_shallow"):
        assert embeddings[name]["dtype"] in ("float32", "bfloat16") and embeddings[name]["runner"] == "traced"
    assert embeddings["retrieval"] == services.report()
    assert embeddings["moderation_shallow"] == featurizer.shallow_report()


def test_healthz_counts_the_forwards_run_on_the_engines_thread(client, monkeypatch):
    from inference import lending

    registry = lending.Lenders()
    monkeypatch.setattr(lending, "LENDERS", registry)
    def take_at_once(job) -> bool:  # an engine between steps
        return job.run() or True

    registry.join(take_at_once)
    registry.run(lambda: 1, wait_s=1.0)
    registry.leave(take_at_once)
    registry.join(lambda job: False)  # one that is stopping
    registry.run(lambda: 1, wait_s=1.0)
    assert client.get("/healthz").json()["embeddings"]["on_engine_thread"] == {"lent": 1, "refused": 1}


def test_healthz_says_which_moderation_checker_could_not_be_built(client, settings):
    from safety import services

    settings.SAFETY_CHECKERS = ["safety.checkers.RulesChecker", "safety.checkers.NoSuchChecker"]
    assert client.get("/healthz").json()["moderation"]["checkers"] is None  # they build on first use
    assert services.load_checkers() == client.get("/healthz").json()["moderation"]["checkers"]
    checkers = services.checkers_report()
    assert checkers["rules"] == "ok"
    assert checkers["NoSuchChecker"].startswith("down: ImportError(")


def test_healthz_is_503_when_redis_is_down(client, settings, tmp_path):
    # Django's setting_changed handler rebuilds the cache handlers both ways.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"unix://{tmp_path}/nothing-here.sock",
        }
    }
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["redis"]["status"] == "down"


def test_healthz_rejects_post(client):
    assert client.post("/healthz").status_code == 405


def test_healthz_says_which_engine_steps_run_on_one_thread(client, chat_engine):
    pool = client.get("/healthz").json()["model_pools"]["small"]
    assert pool["status"] == "ok"
    # The test engine is fp32: every step keeps the engine's thread count, and says why.
    assert pool["step_threads"]["one_thread_rows"] == 0
    assert pool["step_threads"]["reason"] == chat_engine.step_threads.reason
    assert pool["stats"]["one_thread_rows"] == 0


def test_healthz_says_which_web_process_answered(client):
    """A relay node's web processes share one port (WEB_PROCESSES); each
    answers for itself, so a probe can tell them apart."""
    import os

    assert client.get("/healthz").json()["process"] == {"pid": os.getpid(), "web_processes": 1}
