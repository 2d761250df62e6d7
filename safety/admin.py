from django.contrib import admin

from audit.admin import AuditedAdmin
from safety import rules
from safety.models import Rule


@admin.register(Rule)
class RuleAdmin(AuditedAdmin, admin.ModelAdmin):
    """Edits take effect in this process at once, in others within
    SAFETY_RULES_TTL_S; each one is in the audit log."""

    list_display = ("pattern", "kind", "category", "action", "applies_to_output", "enabled", "updated_at")
    list_filter = ("kind", "category", "action", "enabled")
    search_fields = ("pattern", "note")

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        rules.invalidate()

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        rules.invalidate()

    def delete_queryset(self, request, queryset):
        super().delete_queryset(request, queryset)
        rules.invalidate()
