"""Which messages ask to be remembered, and what the fact is."""
import pytest

from memory.detection import explicit_fact, parse_fact_list


@pytest.mark.parametrize("message, fact", [
    ("Remember that I'm vegetarian", "I'm vegetarian"),
    ("remember that my sister is called Ana.", "My sister is called Ana"),
    ("Please remember: I live in Lisbon", "I live in Lisbon"),
    ("Can you remember that my dog is named Rex?", "My dog is named Rex"),
    ("Could you please remember I prefer metric units, thanks", "I prefer metric units"),
    ("Remember my birthday is on May 3", "My birthday is on May 3"),
    ("Don't forget that we use Postgres 16 at work", "We use Postgres 16 at work"),
    ("Hey, remember that I work night shifts. What should I eat before work?", "I work night shifts"),
    ("I'm new here. By the way, remember that I am allergic to nuts!", "I am allergic to nuts"),
    ("Keep in mind that I am a beginner", "I am a beginner"),
    ("REMEMBER THAT MY NAME IS BOB", "MY NAME IS BOB"),
])
def test_an_explicit_request_gives_its_fact(message, fact):
    assert explicit_fact(message) == fact


@pytest.mark.parametrize("message", [
    "Do you remember that film with the whale?",
    "I remember that day very well",
    "Remember when we talked about Rust?",
    "Remember to buy milk",
    "remember that.",
    "What should I remember about Python decorators?",
    "Write a poem called 'Remember that summer'",
    "",
])
def test_questions_recollections_and_reminders_are_not_requests(message):
    assert explicit_fact(message) is None


def test_a_model_list_becomes_facts_without_noise_or_duplicates():
    answer = "- I live in Lisbon\n* I have two cats\n1. I live in Lisbon.\n\nnone\n- x\n- " + "long " * 200
    assert parse_fact_list(answer, limit=5, max_chars=500) == ["I live in Lisbon", "I have two cats"]
    assert parse_fact_list("none", limit=3, max_chars=500) == []
    assert parse_fact_list("- a b\n- c d\n- e f", limit=2, max_chars=500) == ["a b", "c d"]
