"""Users (with ban and unban), invite codes and review flags in the admin."""
from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminPasswordChangeForm

from accounts import services
from accounts.models import InviteCode, ReviewFlag
from audit.admin import AuditedAdmin

User = get_user_model()


def _ban(modeladmin, request, users) -> int:
    count = 0
    for user in users:
        if user.pk == request.user.pk:
            modeladmin.message_user(request, "You cannot ban yourself.", messages.ERROR)
            continue
        services.user_ban(user=user, actor=request.user, request=request)
        count += 1
    return count


class OpenFlagFilter(admin.SimpleListFilter):
    title = "review flag"
    parameter_name = "flagged"

    def lookups(self, request, model_admin):
        return [("open", "open review flag")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.filter(review_flags__resolved_at__isnull=True).distinct()
        return queryset


class PasswordChangeForm(AdminPasswordChangeForm):
    """A staff user's change of someone's password (or disabling it) follows
    PASSWORD_CHANGE_REVOKES_KEYS as the user's own change does: whoever held
    the old password may hold the API keys too."""

    def save(self, commit=True):
        user = super().save(commit=commit)
        if commit:
            services.password_changed(user=user)
        return user


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(AuditedAdmin, DjangoUserAdmin):
    list_display = ("username", "email", "is_active", "is_staff", "date_joined", "last_login")
    list_filter = ("is_active", "is_staff", "is_superuser", OpenFlagFilter)
    actions = ["ban", "unban"]
    change_password_form = PasswordChangeForm

    @admin.action(description="Ban: disable the selected users (sessions, API keys, replies in flight end now)")
    def ban(self, request, queryset):
        count = _ban(self, request, queryset.filter(is_active=True))
        self.message_user(request, f"Banned {count} users.", messages.SUCCESS)

    @admin.action(description="Unban the selected users")
    def unban(self, request, queryset):
        count = 0
        for user in queryset.filter(is_active=False):
            services.user_unban(user=user, actor=request.user, request=request)
            count += 1
        self.message_user(request, f"Unbanned {count} users.", messages.SUCCESS)


@admin.register(InviteCode)
class InviteCodeAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ("code", "note", "uses", "max_uses", "expires_at", "created_by", "created_at")
    search_fields = ("code", "note")
    readonly_fields = ("uses", "created_by", "created_at")

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


class OpenFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "open"), ("resolved", "resolved")]

    def queryset(self, request, queryset):
        if self.value() in ("open", "resolved"):
            return queryset.filter(resolved_at__isnull=self.value() == "open")
        return queryset


@admin.register(ReviewFlag)
class ReviewFlagAdmin(admin.ModelAdmin):
    list_display = ("created_at", "user", "reason", "blocks", "categories", "resolved_at", "resolved_by")
    list_filter = (OpenFilter, "created_at")
    list_select_related = ("user", "resolved_by")
    search_fields = ("user__username", "reason")
    readonly_fields = [f.name for f in ReviewFlag._meta.fields]
    actions = ["resolve", "ban_users"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Resolve: reviewed, no action")
    def resolve(self, request, queryset):
        for flag in queryset.filter(resolved_at__isnull=True):
            services.review_flag_resolve(flag=flag, actor=request.user)
        self.message_user(request, "Resolved.", messages.SUCCESS)

    @admin.action(description="Ban the flagged users and resolve")
    def ban_users(self, request, queryset):
        flags = list(queryset.filter(resolved_at__isnull=True).select_related("user"))
        count = _ban(self, request, [f.user for f in flags if f.user.is_active])
        for flag in flags:
            services.review_flag_resolve(flag=flag, actor=request.user)
        self.message_user(request, f"Banned {count} users.", messages.SUCCESS)
