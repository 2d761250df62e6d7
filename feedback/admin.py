from django.contrib import admin
from django.http import StreamingHttpResponse
from django.utils import timezone

from feedback.models import Feedback
from feedback.selectors import jsonl_lines


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("updated_at", "user", "rating", "category", "model", "short_comment", "message")
    list_filter = ("rating", "model", "category", ("user", admin.RelatedOnlyFieldListFilter), "created_at")
    list_select_related = ("user",)
    search_fields = ("comment", "user__username", "model")
    date_hierarchy = "created_at"
    readonly_fields = ("user", "message", "rating", "category", "comment", "model", "created_at", "updated_at")
    actions = ["export_jsonl"]

    @admin.display(description="comment")
    def short_comment(self, obj):
        return obj.comment[:80]

    def has_add_permission(self, request):
        return False  # users rate their own replies; staff only read

    @admin.action(description="Export the selected feedback as JSONL (with each reply's context)")
    def export_jsonl(self, request, queryset):
        response = StreamingHttpResponse(jsonl_lines(queryset), content_type="application/x-ndjson")
        name = f"feedback-{timezone.now():%Y%m%d-%H%M%S}.jsonl"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
