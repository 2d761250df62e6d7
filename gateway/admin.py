from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from gateway import registry
from gateway.models import ApiKey, Backend, ModelPrice, Plan, PlanAssignment, SemanticCacheEntry, UsageRecord


class InvalidatesRegistry:
    """Edits take effect in this process at once (others within GATEWAY_REGISTRY_TTL_S)."""

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        registry.invalidate()

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        registry.invalidate()


class BackendForm(forms.ModelForm):
    class Meta:
        model = Backend
        fields = "__all__"
        # The key is needed in clear to call the backend, but need not sit on screen.
        widgets = {"api_key": forms.PasswordInput(render_value=True)}


@admin.register(Backend)
class BackendAdmin(InvalidatesRegistry, admin.ModelAdmin):
    form = BackendForm
    list_display = ("name", "kind", "pool", "base_url", "remote_model", "fallbacks", "enabled", "listed")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "base_url", "remote_model")


@admin.register(Plan)
class PlanAdmin(InvalidatesRegistry, admin.ModelAdmin):
    list_display = ("name", "tier", "requests_per_minute", "tokens_per_minute", "tokens_per_day",
                    "tokens_per_month", "is_default")


@admin.register(PlanAssignment)
class PlanAssignmentAdmin(InvalidatesRegistry, admin.ModelAdmin):
    list_display = ("user", "plan")
    list_select_related = ("user", "plan")
    autocomplete_fields = ("user",)
    search_fields = ("user__username",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # keys are created by their owner or with `manage.py create_api_key`

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} keys.", messages.SUCCESS)


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ("created_at", "user", "source", "model", "backend", "status", "cache_hit", "prompt_tokens",
                    "completion_tokens", "charged_tokens", "cost", "ttft_ms", "itl_ms", "duration_ms")
    list_filter = ("source", "status", "cache_hit", "backend")
    list_select_related = ("user",)
    search_fields = ("request_id", "user__username", "route")
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ModelPrice)
class ModelPriceAdmin(InvalidatesRegistry, admin.ModelAdmin):
    """Prices apply to ledger rows written after the edit; past rows keep their cost."""

    list_display = ("model", "basis", "prompt_per_1k", "cached_prompt_per_1k", "completion_per_1k",
                    "hardware_per_hour")
    list_filter = ("basis",)
    search_fields = ("model",)


@admin.register(SemanticCacheEntry)
class SemanticCacheEntryAdmin(admin.ModelAdmin):
    list_display = ("prompt", "scope", "model", "created_at", "expires_at")
    list_filter = ("model",)
    search_fields = ("prompt", "scope")
    exclude = ("embedding",)

    def has_add_permission(self, request):
        return False
