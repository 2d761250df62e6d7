"""Eval runs and their per-item results.

A run belongs to no user: evals measure the deployment's models, and every
staff member with the admin's permissions sees them all (`started_by` only
says who pressed the button).
"""
from django.conf import settings
from django.db import models


class EvalRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    suite = models.CharField(max_length=64, db_index=True)
    model = models.CharField(max_length=64, blank=True, help_text="the model asked for; blank: the suite's default")
    served_by = models.CharField(max_length=64, blank=True, help_text="the model the gateway answered with")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    origin = models.CharField(max_length=8, default="command")  # command | admin
    limit = models.PositiveIntegerField(null=True, blank=True)
    threshold = models.FloatField()
    items_total = models.PositiveIntegerField(default=0)
    items_done = models.PositiveIntegerField(default=0)
    score = models.FloatField(null=True, blank=True, help_text="share of items that passed every check")
    scorer_means = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["suite", "-created_at"])]

    def __str__(self):
        return f"{self.suite} #{self.pk}"

    @property
    def passed(self) -> bool | None:
        return None if self.score is None else self.score >= self.threshold

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class EvalResult(models.Model):
    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="results")
    item_id = models.CharField(max_length=128)
    prompt = models.TextField()
    output = models.TextField(blank=True)  # what the user would see (a title after the title job's cleanup)
    raw_output = models.TextField(blank=True)  # the model's own text, where the product reworks it
    finish_reason = models.CharField(max_length=16, blank=True)
    model = models.CharField(max_length=64, blank=True)
    scores = models.JSONField(default=dict)  # {check name: value in [0, 1] or null when skipped}
    score = models.FloatField()  # mean of the checks that ran
    passed = models.BooleanField()
    latency_s = models.FloatField()
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["run", "item_id"], name="one_result_per_item")]

    def __str__(self):
        return self.item_id
