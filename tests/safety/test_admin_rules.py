"""Rules edited in the admin take effect at once, in this process."""
import pytest
from django.urls import reverse

from safety.models import Rule
from safety.services import moderate_input, moderate_output

pytestmark = pytest.mark.django_db(transaction=True)


def _add(admin_client, **fields):
    data = {"kind": "term", "pattern": "", "category": "blocked_term", "action": "block",
            "applies_to_output": "on", "enabled": "on", "note": "", **fields}
    return admin_client.post(reverse("admin:safety_rule_add"), data)


def test_a_term_added_in_the_admin_blocks_at_once(admin_client, settings):
    settings.SAFETY_RULES_TTL_S = 3600  # only the admin's invalidation can make it visible
    assert not moderate_input("tell me about zorblax").flagged  # warms the cached rule set
    response = _add(admin_client, pattern="Zorblax", category="violence")
    assert response.status_code == 302, response.content[:500]
    verdict = moderate_input("tell me about z o r b l a x")
    assert verdict.blocked and verdict.category == "violence" and verdict.checker.startswith("rules:admin:")


def test_disabling_and_deleting_a_rule_lift_it(admin_client, settings):
    settings.SAFETY_RULES_TTL_S = 3600
    _add(admin_client, pattern="zorblax")
    rule = Rule.objects.get()
    assert moderate_input("zorblax").blocked
    data = {"kind": "term", "pattern": "zorblax", "category": "blocked_term", "action": "block", "note": ""}
    admin_client.post(reverse("admin:safety_rule_change", args=[rule.pk]), data)  # enabled unticked
    assert not moderate_input("zorblax").flagged
    admin_client.post(reverse("admin:safety_rule_delete", args=[rule.pk]), {"post": "yes"})
    assert not Rule.objects.exists()


def test_a_regex_rule_and_an_input_only_rule(admin_client):
    _add(admin_client, kind="regex", pattern=r"order\s+#?\d{6}", applies_to_output="")
    assert moderate_input("where is order #123456?").blocked
    assert not moderate_output("your order 123456 ships today").flagged


def test_a_flag_rule_flags_without_blocking(admin_client):
    _add(admin_client, pattern="refund", action="flag")
    assert not moderate_input("I want a refund").blocked


def test_a_bad_regex_is_refused_with_a_clear_error(admin_client):
    response = _add(admin_client, kind="regex", pattern="(unclosed")
    assert response.status_code == 200 and b"Not a valid regular expression" in response.content
    assert not Rule.objects.exists()


def test_the_rule_changelist_renders(admin_client):
    _add(admin_client, pattern="zorblax")
    assert admin_client.get(reverse("admin:safety_rule_changelist")).status_code == 200


def test_a_term_of_invisible_characters_is_refused(admin_client):
    response = _add(admin_client, pattern="\u200b\u200b")
    assert response.status_code == 200 and b"The pattern is empty" in response.content
    assert not Rule.objects.exists()
