"""Gateway data: backends, plans, the usage ledger, API keys, semantic cache."""
from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator
from django.db import models
from django.contrib.postgres.indexes import BrinIndex
from pgvector.django import HnswIndex, VectorField

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2


def validate_base_url(value: str) -> None:
    """http(s) with a host. Not URLField: it rejects the dotless host names
    (gpu-box, vllm) that backends usually have on a private network."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("Enter an http:// or https:// URL with a host, e.g. http://gpu-box:8000/v1")


class Backend(models.Model):
    """A model the gateway can route to, edited in the admin.

    Local pools (settings.MODEL_POOLS) and GATEWAY_BACKENDS_JSON exist without
    a row; a row with the same name overrides them (or disables them).
    """

    KIND_LOCAL = "local"
    KIND_OPENAI = "openai"
    KINDS = [(KIND_LOCAL, "local engine pool"), (KIND_OPENAI, "remote OpenAI-compatible server")]

    name = models.SlugField(max_length=64, unique=True, help_text="the model name users and the API ask for")
    kind = models.CharField(max_length=16, choices=KINDS, default=KIND_OPENAI)
    pool = models.CharField(max_length=64, blank=True, help_text="local: the engine pool name")
    base_url = models.CharField(
        max_length=500, blank=True, validators=[validate_base_url], help_text="remote: e.g. http://gpu-box:8000/v1"
    )
    remote_model = models.CharField(max_length=200, blank=True, help_text="remote: the model id it expects")
    api_key = models.CharField(max_length=500, blank=True, help_text="remote: bearer key, if it needs one")
    context_window = models.PositiveIntegerField(default=8192)
    fallbacks = models.CharField(
        max_length=500, blank=True, help_text="comma-separated model names tried in order when this one fails"
    )
    enabled = models.BooleanField(default=True)
    listed = models.BooleanField(default=True, help_text="shown in /v1/models and the model picker")
    # A prompt is moderated beside routing and the quota. The local engine
    # starts generating meanwhile and is aborted if the prompt is blocked; a
    # remote is sent nothing until the verdict, since a hosted provider would
    # see (and bill, and flag our key for) a blocked prompt. A server the
    # operator runs is inside the deployment like the engine: opening it
    # beside the check hides its time to the first chunk (bench.admission).
    self_hosted = models.BooleanField(
        default=False,
        help_text="remote: a server you run (vLLM, TGI, llama.cpp, Ollama). It is sent a prompt while the prompt "
                  "is still being moderated, and aborted if the prompt is blocked; off, a prompt is sent only "
                  "once it passed (hosted providers)",
    )

    def __str__(self):
        return self.name

    def clean(self):
        if self.kind == self.KIND_OPENAI and not self.base_url:
            raise ValidationError({"base_url": "A remote backend needs its base URL."})
        if self.kind == self.KIND_LOCAL and self.self_hosted:
            raise ValidationError({"self_hosted": "Only a remote backend can be marked self-hosted: a local "
                                                  "pool is always opened beside the prompt's check."})
        if self.kind == self.KIND_LOCAL and (self.pool or self.name) not in settings.MODEL_POOLS:
            raise ValidationError({"pool": f"No such engine pool; configured: {', '.join(settings.MODEL_POOLS)}"})


class Plan(models.Model):
    """Per-user limits. 0 means unlimited."""

    TIER_STANDARD = "standard"
    TIER_PRO = "pro"
    TIERS = [(TIER_STANDARD, "standard (small model when routed)"), (TIER_PRO, "pro (may route to large)")]

    name = models.CharField(max_length=64, unique=True)
    tier = models.CharField(max_length=16, choices=TIERS, default=TIER_STANDARD)
    requests_per_minute = models.PositiveIntegerField(default=60)
    tokens_per_minute = models.PositiveIntegerField(default=40000)
    tokens_per_day = models.PositiveIntegerField(default=1000000)
    tokens_per_month = models.PositiveIntegerField(default=10000000)
    allowed_models = models.CharField(
        max_length=500, blank=True, help_text="comma-separated model names; empty allows every model"
    )
    is_default = models.BooleanField(default=False, help_text="the plan of users without one")
    # Abuse controls (audit/ and docs/SECURITY.md): a cap on generations in
    # flight per user, and who is shed first when the deployment is full.
    max_concurrent = models.PositiveIntegerField(
        default=4, help_text="generations one user may have in flight at once (chat and API together); 0 = no cap"
    )
    priority = models.PositiveSmallIntegerField(
        default=0, validators=[MaxValueValidator(100)],
        help_text="0-100: in a capacity spike lower priorities are refused first (429), 100 last",
    )

    def __str__(self):
        return self.name


class PlanAssignment(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="plan_assignment")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="assignments")

    def __str__(self):
        return f"{self.user} → {self.plan}"


class ApiKey(models.Model):
    """A bearer key; only its SHA-256 is stored (keys are 256-bit random, so a
    fast hash is enough and keeps the per-request lookup cheap)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="the first characters, to recognise a key")
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"


class UsageRecord(models.Model):
    """The ledger: one row per request that reached the gateway's policy."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL)
    request_id = models.CharField(max_length=64, db_index=True)
    source = models.CharField(max_length=16)  # chat | api | task
    model = models.CharField(max_length=64, help_text="what was asked for (empty: routed)")
    backend = models.CharField(max_length=64, help_text="what served it")
    route = models.CharField(max_length=200)
    status = models.CharField(max_length=16)  # stop | length | abort | error | content_filter | blocked
    cache_hit = models.CharField(max_length=16, blank=True)  # "" | exact | semantic
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    charged_tokens = models.PositiveIntegerField(default=0, help_text="what counted against the quota")
    reserved_tokens = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Cost (issue 15), priced by ModelPrice in the finish stage; cache hits cost 0.
    # `saved_*` is what the exact/semantic cache, the engines' prefix cache and the
    # router kept off the bill (gateway.pricing says how each is valued).
    cost = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    saved_cache = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    saved_prefix = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    saved_routing = models.DecimalField(max_digits=18, decimal_places=9, default=0)
    itl_ms = models.FloatField(null=True, blank=True, help_text="mean inter-token latency (generated replies)")
    generation_ms = models.PositiveIntegerField(null=True, blank=True, help_text="backend open to last event")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="usage_user_newest"),
            # Rows arrive in time order: a BRIN index keeps the dashboard's
            # time-range scans (rollups, top users) off the whole ledger for a few pages.
            BrinIndex(fields=["created_at"], name="usage_created_brin"),
        ]


class ModelPrice(models.Model):
    """What one model (a local pool or a remote backend, by its gateway name) costs.

    Kept apart from Backend: local pools and GATEWAY_BACKENDS_JSON entries have
    no Backend row, and pricing one must not mean overriding its routing.
    """

    BASIS_TOKENS = "tokens"
    BASIS_HARDWARE = "hardware"
    BASES = [(BASIS_TOKENS, "per 1k tokens"), (BASIS_HARDWARE, "hardware time (local pools)")]

    model = models.SlugField(max_length=64, unique=True, help_text="the gateway's model name (pool or backend)")
    basis = models.CharField(max_length=16, choices=BASES, default=BASIS_TOKENS)
    prompt_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    cached_prompt_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, default=0,
        help_text="prompt tokens served from a prefix cache (0 on our own engines; a provider's cached-input price)",
    )
    completion_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    hardware_per_hour = models.DecimalField(
        max_digits=12, decimal_places=6, default=0, help_text="hardware basis: price per hour × generation seconds"
    )

    def __str__(self):
        return self.model

    def clean(self):
        prices = (self.prompt_per_1k, self.cached_prompt_per_1k, self.completion_per_1k, self.hardware_per_hour)
        if any(p is not None and p < 0 for p in prices):
            raise ValidationError("Prices cannot be negative.")
        if self.basis == self.BASIS_HARDWARE and self.model not in settings.MODEL_POOLS:
            if not Backend.objects.filter(name=self.model, kind=Backend.KIND_LOCAL).exists():
                raise ValidationError({"basis": "Hardware time prices only local engine pools."})


class SemanticCacheEntry(models.Model):
    """A reply reusable for prompts that mean the same, within one scope.

    `scope` is "user:<id>" (default) or "deployment"; `key_hash` covers the
    model, the system prompt and the sampling parameters, so only prompts
    asked under identical conditions are compared by meaning.
    """

    scope = models.CharField(max_length=64)
    key_hash = models.CharField(max_length=64)
    prompt = models.TextField()
    embedding = VectorField(dimensions=EMBEDDING_DIM)
    response = models.TextField()
    finish_reason = models.CharField(max_length=16)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    model = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        indexes = [
            models.Index(fields=["scope", "key_hash"], name="semcache_scope_key"),
            HnswIndex(
                name="semcache_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
            ),
        ]
