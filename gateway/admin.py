from django import forms
from django.contrib import admin, messages

from audit.admin import AuditedAdmin
from gateway import keys
from gateway.models import ApiKey, Backend, ModelPrice, Plan, PlanAssignment, SemanticCacheEntry, UsageRecord


class BackendForm(forms.ModelForm):
    """The key is write-only: it is needed in clear to call the backend, but
    is never sent back to a browser (not even in a password field's value,
    which the page source shows). Empty keeps the stored key."""

    api_key = forms.CharField(
        required=False, max_length=500, widget=forms.PasswordInput(render_value=False),
        help_text="remote: bearer key, if it needs one. Write-only: leave empty to keep the current key.",
    )
    clear_api_key = forms.BooleanField(required=False, label="Remove the stored key")

    class Meta:
        model = Backend
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial["api_key"] = ""
        if self.instance.pk and self.instance.api_key:
            self.fields["api_key"].help_text = "A key is stored (not shown). Type a new one to replace it."

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("clear_api_key"):
            cleaned["api_key"] = ""
        elif not cleaned.get("api_key"):
            cleaned["api_key"] = self.instance.api_key if self.instance.pk else ""
        return cleaned


@admin.register(Backend)
class BackendAdmin(AuditedAdmin, admin.ModelAdmin):
    form = BackendForm
    list_display = ("name", "kind", "pool", "base_url", "remote_model", "fallbacks", "enabled", "listed",
                    "self_hosted")
    list_filter = ("kind", "enabled", "self_hosted")
    search_fields = ("name", "base_url", "remote_model")


@admin.register(Plan)
class PlanAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("name", "tier", "priority", "max_concurrent", "requests_per_minute", "tokens_per_minute",
                    "tokens_per_day", "tokens_per_month", "is_default")


@admin.register(PlanAssignment)
class PlanAssignmentAdmin(AuditedAdmin, admin.ModelAdmin):
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
        count = keys.api_keys_revoke(queryset)
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
class ModelPriceAdmin(AuditedAdmin, admin.ModelAdmin):
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
