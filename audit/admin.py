"""The audit log in the admin (read-only), and `AuditedAdmin`, the mixin that
records every add, change and delete made through another app's admin.

Apply it by putting it first in a ModelAdmin's bases:

    @admin.register(Rule)
    class RuleAdmin(AuditedAdmin, admin.ModelAdmin): ...

It hooks the admin's own logging methods (`log_addition`, `log_change`,
`log_deletions`), which Django calls for the add and change forms, the delete
page and bulk deletes alike.
"""
from __future__ import annotations

from django.contrib import admin

from audit.models import AuditEvent
from audit.services import Kind, audit_record


class AuditedAdmin:
    def _audit(self, request, obj, verb: str, message) -> None:
        meta = obj._meta
        audit_record(
            kind=Kind.ADMIN_CHANGE, actor=request.user, request=request,
            summary=f"{verb} {meta.verbose_name} {str(obj)[:150]!r}",
            data={"model": meta.label_lower, "object_id": str(obj.pk), "action": verb,
                  # Django's change message names the changed fields, never their values.
                  "change": message if isinstance(message, (list, str)) else str(message)},
        )

    def log_addition(self, request, obj, message):
        self._audit(request, obj, "added", message)
        return super().log_addition(request, obj, message)

    def log_change(self, request, obj, message):
        self._audit(request, obj, "changed", message)
        return super().log_change(request, obj, message)

    def log_deletions(self, request, queryset):
        for obj in queryset:
            self._audit(request, obj, "deleted", "")
        return super().log_deletions(request, queryset)


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "kind", "actor_name", "target_name", "ip", "summary")
    list_filter = (
        "kind",
        ("actor", admin.RelatedOnlyFieldListFilter),
        ("target_user", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    date_hierarchy = "created_at"
    search_fields = ("summary", "actor_name", "target_name", "ip")
    readonly_fields = [f.name for f in AuditEvent._meta.fields]
    actions = None  # not even "delete selected"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
