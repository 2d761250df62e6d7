"""Eval runs in the admin: start one (a Celery job on the worker), watch its
progress, and compare it with the suite's previous run (a table and plots).

Runs belong to the deployment, not to a user: any staff member with the
admin's permissions on them sees every run, and nobody else sees any.
"""
from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from evals import charts, selectors, services, suites, tasks
from evals.models import EvalResult, EvalRun


class StartRunForm(forms.Form):
    suite = forms.ChoiceField(choices=())
    model = forms.CharField(required=False, max_length=64, help_text="a model pool or backend; blank: the default")
    limit = forms.IntegerField(required=False, min_value=1, help_text="only the first N items")
    threshold = forms.FloatField(required=False, min_value=0, max_value=1, help_text="blank: the suite's own")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["suite"].choices = [(name, f"{name} ({count} items, threshold {threshold:.0%})")
                                        for name, count, threshold, _ in suites.describe()]


class EvalResultInline(admin.TabularInline):
    model = EvalResult
    fields = ("item_id", "passed", "score", "scores", "output", "raw_output", "finish_reason", "latency_s", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(EvalRun)
class EvalRunAdmin(admin.ModelAdmin):
    list_display = ("id", "suite", "model", "served_by", "status", "progress", "score_pct", "verdict",
                    "origin", "created_at")
    list_filter = ("suite", "status", "served_by", "origin")
    search_fields = ("suite", "model", "served_by")
    readonly_fields = ("suite", "model", "served_by", "status", "origin", "limit", "threshold", "items_total",
                       "items_done", "score", "scorer_means", "error", "started_by", "created_at", "started_at",
                       "finished_at")
    inlines = [EvalResultInline]
    change_form_template = "admin/evals/evalrun/change_form.html"

    @admin.display(description="progress")
    def progress(self, run):
        return f"{run.items_done}/{run.items_total}"

    @admin.display(description="score", ordering="score")
    def score_pct(self, run):
        return "-" if run.score is None else f"{run.score:.0%}"

    @admin.display(description="passed", boolean=True)
    def verdict(self, run):
        return run.passed

    def has_change_permission(self, request, obj=None):
        return False  # results are measurements: read only

    def add_view(self, request, form_url="", extra_context=None):
        """"Add eval run" starts one: a form, then a Celery job."""
        if not self.has_add_permission(request):
            return self.changeform_view(request, None, form_url, extra_context)  # Django's own 403
        form = StartRunForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            run = self._start(request, form)
            if run is not None:
                messages.success(request, f"Eval run #{run.pk} of {run.suite} started.")
                return HttpResponseRedirect(reverse("admin:evals_evalrun_change", args=[run.pk]))
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "form": form,
                   "title": "Start an eval run", "suites": suites.describe()}
        return TemplateResponse(request, "admin/evals/evalrun/start.html", context)

    def _start(self, request, form) -> EvalRun | None:
        data = form.cleaned_data
        try:
            run = services.run_create(suite=data["suite"], model=data["model"], limit=data["limit"],
                                      threshold=data["threshold"], origin="admin", started_by=request.user)
        except (suites.SuiteError, ValueError) as exc:
            form.add_error(None, str(exc))
            return None
        tasks.enqueue(run)
        return run

    def change_view(self, request, object_id, form_url="", extra_context=None):
        run = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if run is not None:
            comparison = selectors.compare(run)
            extra.update(run=run, comparison=comparison, in_progress=run.status in ("queued", "running"))
            if run.status == EvalRun.Status.DONE:
                extra["bars"] = charts.comparison_bars(comparison)
                extra["history"] = charts.history_line(selectors.history(run.suite, upto=run), run.threshold)
        return super().change_view(request, object_id, form_url, extra)


@admin.register(EvalResult)
class EvalResultAdmin(admin.ModelAdmin):
    list_display = ("item_id", "run_link", "passed", "score", "finish_reason", "latency_s", "model")
    list_filter = ("passed", "run__suite", "model", "finish_reason")
    search_fields = ("item_id", "prompt", "output")
    list_select_related = ("run",)
    readonly_fields = [f.name for f in EvalResult._meta.fields]

    @admin.display(description="run")
    def run_link(self, result):
        return format_html('<a href="{}">{}</a>', reverse("admin:evals_evalrun_change", args=[result.run_id]),
                           result.run)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
