"""The admin edits backends and plans, and the gateway sees it at once."""
import pytest
from django.urls import reverse

from gateway import registry
from gateway.models import ApiKey, Backend, Plan, PlanAssignment, SemanticCacheEntry, UsageRecord


@pytest.mark.parametrize("model", [Backend, Plan, PlanAssignment, ApiKey, UsageRecord, SemanticCacheEntry])
def test_every_gateway_changelist_renders(admin_client, model):
    url = reverse(f"admin:gateway_{model._meta.model_name}_changelist")
    assert admin_client.get(url).status_code == 200


def test_adding_a_backend_in_the_admin_registers_it(admin_client):
    registry.backends()  # warm the cache: the admin save must invalidate it
    response = admin_client.post(reverse("admin:gateway_backend_add"), {
        "name": "gpu-box", "kind": "openai", "pool": "", "base_url": "http://gpu-box:8000/v1",
        "remote_model": "llama", "api_key": "secret", "context_window": 8192, "fallbacks": "small",
        "enabled": "on", "listed": "on",
    })
    assert response.status_code == 302, response.content
    spec = registry.backends()["gpu-box"]
    assert spec.base_url == "http://gpu-box:8000/v1" and spec.fallbacks == ("small",)


def test_a_backend_is_self_hosted_only_when_marked(db, settings):
    settings.GATEWAY_BACKENDS = {
        "vllm": {"base_url": "http://gpu-box:8000/v1", "self_hosted": True},
        "hosted": {"base_url": "https://api.example.com/v1"},
    }
    Backend.objects.create(name="ollama", kind="openai", base_url="http://ollama:11434/v1", self_hosted=True)
    Backend.objects.create(name="provider", kind="openai", base_url="https://api.example.org/v1")
    registry.invalidate()
    specs = registry.backends()
    assert {name for name, spec in specs.items() if spec.opens_before_verdict} == {"vllm", "ollama",
                                                                                   *settings.MODEL_POOLS}
    assert not specs["hosted"].opens_before_verdict and not specs["provider"].opens_before_verdict


def test_a_local_pool_cannot_be_marked_self_hosted(admin_client):
    response = admin_client.post(reverse("admin:gateway_backend_add"), {
        "name": "small", "kind": "local", "pool": "small", "context_window": 8192, "enabled": "on",
        "self_hosted": "on",
    })
    assert response.status_code == 200 and b"Only a remote backend can be marked self-hosted" in response.content
    assert not Backend.objects.filter(name="small").exists()


def test_a_disabled_row_hides_a_configured_pool(db):
    Backend.objects.create(name="small", kind="local", enabled=False)
    registry.invalidate()
    assert "small" not in registry.backends()


def test_a_remote_backend_needs_a_base_url(admin_client):
    response = admin_client.post(reverse("admin:gateway_backend_add"), {
        "name": "nowhere", "kind": "openai", "context_window": 8192, "enabled": "on",
    })
    assert response.status_code == 200 and not Backend.objects.filter(name="nowhere").exists()
