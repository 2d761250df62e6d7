"""Eval runs in the admin: staff start one as a Celery job (its requests
reach the serving process's /v1 API, as the model-free worker's do), watch
its progress, and see it against the previous run. Runs are nobody's:
every staff member with the permissions sees them all; nobody else any."""
import re

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from evals import services
from evals.models import EvalRun

pytestmark = pytest.mark.django_db

ADD = reverse("admin:evals_evalrun_add")
RIGHT = {"capital of France": "Paris is the capital of France.", "capital of Japan": "Tokyo is the capital of Japan.",
         "capital of Italy": "Rome is the capital of Italy."}


def change_url(run):
    return reverse("admin:evals_evalrun_change", args=[run.pk])


def start(client, **data):
    return client.post(ADD, {"suite": "qa", "model": "", "limit": "3", "threshold": "", **data})


def test_staff_start_a_run_as_a_job_over_the_serving_api_and_see_it_finish(
        admin_client, answering_gateway, django_capture_on_commit_callbacks, monkeypatch):
    from evals import callers

    over_http = []
    post = callers.ServingApiCaller._post
    monkeypatch.setattr(callers.ServingApiCaller, "_post",
                        lambda self, path, body, headers=None: over_http.append(path) or post(self, path, body, headers))
    answering_gateway.answers = RIGHT
    assert "qa (20 items, threshold 50%)" in admin_client.get(ADD).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = start(admin_client)
    run = EvalRun.objects.get()
    assert response.status_code == 302 and response["Location"] == change_url(run)
    assert (run.status, run.origin, run.items_done, run.score) == ("done", "admin", 3, 1.0)
    assert over_http.count("/v1/chat/completions") == 3 and "/v1/embeddings" in over_http
    # The worker's requests ask the API to skip the reply caches.
    assert all(not r.use_cache and r.source == "task" for r in answering_gateway.requests)
    page = admin_client.get(change_url(run)).content.decode()
    assert 'value="3"' in page and "Done: 3 of 3 items" in page and "no previous run" in page
    assert 'http-equiv="refresh"' not in page  # finished: nothing to wait for


def test_a_running_run_shows_its_progress_and_reloads(admin_client):
    run = services.run_create(suite="qa", limit=4)
    EvalRun.objects.filter(pk=run.pk).update(status="running", items_done=1)
    page = admin_client.get(change_url(run)).content.decode()
    assert re.search(r'<progress id="eval-progress" max="4" value="1">', page)
    assert "Running: 1 of 4 items" in page and 'http-equiv="refresh" content="3"' in page


def test_a_run_is_compared_with_the_previous_one_in_a_table_and_svg_plots(admin_client, answering_gateway):
    from evals.callers import GatewayCaller

    answering_gateway.answers = RIGHT
    first = services.run_execute(run=services.run_create(suite="qa", limit=3), caller=GatewayCaller())
    answering_gateway.answers = {**RIGHT, "capital of Italy": "Madrid."}
    second = services.run_execute(run=services.run_create(suite="qa", limit=3), caller=GatewayCaller())
    page = admin_client.get(change_url(second)).content.decode()
    table = page[page.index('<table id="eval-comparison">'):]
    assert f"run #{first.pk}</a>" in page
    assert re.search(r"score \(items passed\)</td>\s*<td>0.67</td>\s*<td>1.00</td>\s*<td>-0.33</td>", table)
    assert "Now failing: capital-italy" in page
    svgs = re.findall(r"<svg[^>]*role=\"img\".*?</svg>", page, re.S)
    assert len(svgs) == 2 and "this run against the previous one" in svgs[0] and f"run #{second.pk}" in svgs[1]
    assert not any("<script" in svg or "style=" in svg for svg in svgs)  # CSP: no script, no inline style


def test_a_failed_enqueue_marks_the_run_failed(admin_client, django_capture_on_commit_callbacks, monkeypatch):
    from evals import tasks

    def broker_down(*args):
        raise ConnectionError("broker down")

    monkeypatch.setattr(tasks.run_eval, "delay", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        start(admin_client)
    run = EvalRun.objects.get()
    assert run.status == "failed" and "broker down" in run.error


def test_a_bad_start_form_is_shown_again_with_its_error(admin_client):
    response = start(admin_client, suite="nope", limit="0")
    assert response.status_code == 200 and not EvalRun.objects.exists()
    assert "Select a valid choice" in response.content.decode()


def test_non_staff_are_sent_to_the_admin_login(alice_client):
    run = services.run_create(suite="qa")
    for url in (ADD, change_url(run), reverse("admin:evals_evalrun_changelist")):
        response = alice_client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert start(alice_client).status_code == 302 and EvalRun.objects.count() == 1


def test_staff_without_the_permissions_get_403(alice):
    alice.is_staff = True
    alice.save()
    client = Client()
    client.force_login(alice)
    run = services.run_create(suite="qa")
    assert client.get(change_url(run)).status_code == 403
    assert start(client).status_code == 403 and EvalRun.objects.count() == 1


def test_any_staff_member_with_the_permissions_sees_runs_others_started(admin_user, alice, bob):
    """Runs belong to the deployment, not to whoever started them."""
    run = services.run_create(suite="qa", origin="admin", started_by=admin_user)
    bob.is_staff = True
    bob.save()
    bob.user_permissions.add(Permission.objects.get(codename="view_evalrun"))
    client = Client()
    client.force_login(bob)
    assert client.get(change_url(run)).status_code == 200
    assert change_url(run) in client.get(reverse("admin:evals_evalrun_changelist")).content.decode()
    assert start(client).status_code == 403  # viewing is not starting


def test_result_and_run_lists_render(admin_client, answering_gateway):
    from evals.callers import GatewayCaller

    services.run_execute(run=services.run_create(suite="qa", limit=1), caller=GatewayCaller())
    for name in ("evalrun", "evalresult"):
        assert admin_client.get(reverse(f"admin:evals_{name}_changelist")).status_code == 200
