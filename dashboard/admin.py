from django.contrib import admin

from dashboard.models import MinuteRollup


@admin.register(MinuteRollup)
class MinuteRollupAdmin(admin.ModelAdmin):
    list_display = ("minute", "model", "requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens",
                    "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "cost")
    list_filter = ("model",)
    date_hierarchy = "minute"

    def has_add_permission(self, request):
        return False  # written by the rollup task

    def has_change_permission(self, request, obj=None):
        return False
