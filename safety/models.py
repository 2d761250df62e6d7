"""Rules the deployment's admins edit: blocked terms and patterns."""
from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.db import models

from safety.normalize import fold
from safety.taxonomy import BLOCK, BLOCKED_TERM, CATEGORIES, FLAG

CATEGORY_CHOICES = [(c, c) for c in CATEGORIES]


class Rule(models.Model):
    """A term (matched as a word after folding: case, accents, homoglyphs,
    zero-width characters, spacing and leetspeak) or a regular expression
    (matched against the folded text, case-insensitive)."""

    KIND_TERM = "term"
    KIND_REGEX = "regex"

    kind = models.CharField(max_length=8, choices=[(KIND_TERM, "term"), (KIND_REGEX, "regular expression")],
                            default=KIND_TERM)
    pattern = models.CharField(max_length=500)
    category = models.CharField(max_length=32, choices=CATEGORY_CHOICES, default=BLOCKED_TERM)
    action = models.CharField(max_length=8, choices=[(BLOCK, "block"), (FLAG, "flag")], default=BLOCK)
    applies_to_output = models.BooleanField(default=True, help_text="Also stop replies that contain it.")
    enabled = models.BooleanField(default=True)
    note = models.CharField(max_length=200, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["category", "pattern"]
        constraints = [models.UniqueConstraint(fields=["kind", "pattern"], name="safety_rule_unique_pattern")]

    def __str__(self) -> str:
        return f"{self.kind}: {self.pattern}"

    def clean(self) -> None:
        if not self.pattern.strip() or (self.kind == self.KIND_TERM and not fold(self.pattern).strip()):
            raise ValidationError({"pattern": "The pattern is empty (once case, spacing and invisible characters are folded)."})
        if self.kind == self.KIND_REGEX:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValidationError({"pattern": f"Not a valid regular expression: {exc}"}) from None
