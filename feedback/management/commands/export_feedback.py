"""`manage.py export_feedback [--since DATE] [--rating up|down] [--model NAME] [--output FILE]`"""
import datetime as dt

from django.core.management.base import BaseCommand, CommandError

from feedback.selectors import jsonl_lines
from feedback.models import Feedback


class Command(BaseCommand):
    help = "Write feedback as JSONL, each line with the conversation context the reply answered."

    def add_arguments(self, parser):
        parser.add_argument("--since", help="only feedback set on or after this date (YYYY-MM-DD)")
        parser.add_argument("--rating", choices=["up", "down"])
        parser.add_argument("--model", help="only replies written by this model")
        parser.add_argument("--output", "-o", help="file to write (default: standard output)")

    def handle(self, *args, since=None, rating=None, model=None, output=None, **options):
        rows = Feedback.objects.all()
        if since:
            try:
                day = dt.date.fromisoformat(since)
            except ValueError:
                raise CommandError(f"--since {since!r} is not a date like 2026-01-31") from None
            rows = rows.filter(updated_at__date__gte=day)
        if rating:
            rows = rows.filter(rating=Feedback.Rating.UP if rating == "up" else Feedback.Rating.DOWN)
        if model:
            rows = rows.filter(model=model)
        try:
            out = open(output, "w", encoding="utf-8") if output else self.stdout
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror}") from None
        count = 0
        try:
            for line in jsonl_lines(rows):
                out.write(line)
                count += 1
        finally:
            if output:
                out.close()
        self.stderr.write(f"exported {count} feedback records")
