"""`manage.py run_evals SUITE [--model NAME] [--limit N] [--threshold X]`.

Runs a suite through the gateway in this process (the pools load on first
use), prints each item and the comparison with the suite's previous run, and
exits with status 1 when the score is below the threshold, so a deploy can
gate on it. `--list` prints the suites; SUITE `all` runs every one.
"""
from django.core.management.base import BaseCommand, CommandError

from evals import selectors, services, suites
from evals.callers import GatewayCaller
from evals.models import EvalRun


class Command(BaseCommand):
    help = "Run an eval suite through the gateway; exit 1 when its score is below the threshold."

    def add_arguments(self, parser):
        parser.add_argument("suite", nargs="?", help="a suite name (see --list), or 'all'")
        parser.add_argument("--list", dest="list_suites", action="store_true", help="print the suites and exit")
        parser.add_argument("--model", default="", help="a model pool or backend (default: the router's choice)")
        parser.add_argument("--limit", type=int, help="run only the first N items")
        parser.add_argument("--threshold", type=float, help="the passing score, 0-1 (default: the suite's own)")

    def handle(self, *args, suite, list_suites, model, limit, threshold, **options):
        if list_suites:
            return self._list()
        if not suite:
            raise CommandError("Name a suite (or 'all'); --list prints them.")
        names = suites.names() if suite == "all" else [suite]
        runs = [self._run(name, model, limit, threshold) for name in names]
        failed = [run for run in runs if not run.passed]
        if failed:
            raise CommandError("below the threshold: " + ", ".join(f"{r.suite} {_pct(r.score)} < {_pct(r.threshold)}"
                                                                    for r in failed), returncode=1)

    def _list(self):
        try:
            rows = suites.describe()
        except suites.SuiteError as exc:
            raise CommandError(str(exc)) from exc
        for name, count, threshold, description in rows:
            self.stdout.write(f"{name:<14} {count:>4} items  threshold {_pct(threshold):>4}  {description}")

    def _run(self, name, model, limit, threshold) -> EvalRun:
        try:
            run = services.run_create(suite=name, model=model, limit=limit, threshold=threshold)
        except (suites.SuiteError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{name}: {run.items_total} items, model {model or 'default'} (run #{run.pk})")
        run = services.run_execute(run=run, caller=GatewayCaller())
        if run.status == EvalRun.Status.FAILED:
            raise CommandError(f"{name}: the run failed: {run.error}")
        for result in run.results.all():
            mark = "pass" if result.passed else "FAIL"
            output = " ".join(result.output.split())[:70]
            if result.raw_output and result.raw_output != result.output:
                output = f"{' '.join(result.raw_output.split())[:50]!r} -> {output}"
            self.stdout.write(f"  {mark} {result.item_id:<28} {result.latency_s:6.2f}s  {output}")
        self._comparison(run)
        return run

    def _comparison(self, run: EvalRun) -> None:
        comparison = selectors.compare(run)
        before = f"run #{comparison.previous.pk}" if comparison.previous else "no previous run"
        self.stdout.write(f"  {'':<22} {'now':>7} {before:>16}")
        for row in comparison.rows:
            delta = "" if row.delta is None else f"{row.delta:+.2f}"
            self.stdout.write(f"  {row.name:<22} {_num(row.now):>7} {_num(row.before):>16} {delta:>6}")
        if comparison.fixed or comparison.broken:
            self.stdout.write(f"  now passing: {', '.join(comparison.fixed) or '-'}; "
                              f"now failing: {', '.join(comparison.broken) or '-'}")
        verdict = "PASS" if run.passed else "BELOW THRESHOLD"
        self.stdout.write(f"{run.suite}: score {_pct(run.score)} (threshold {_pct(run.threshold)}) {verdict}, "
                          f"{run.duration_s:.1f} s, served by {run.served_by or '-'}")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"
