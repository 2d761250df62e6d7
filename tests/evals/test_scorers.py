"""Each scorer on replies whose score is known."""
import pytest

from evals import scorers
from evals.callers import Reply
from retrieval.services import embed


def scoring(item=None, judge=None):
    return scorers.Scoring(item=item or {}, embed=embed, judge=judge or (lambda *args: None))


def value(check, text, finish_reason="stop", item=None, **reply):
    return scorers.SCORERS[check["scorer"]](check, Reply(text, finish_reason, **reply), scoring(item))


def test_exact_ignores_case_surrounding_space_and_final_punctuation():
    assert value({"scorer": "exact", "expected": "yes"}, "  YES. ") == 1.0
    assert value({"scorer": "exact", "expected": "yes"}, "Yes, sure") == 0.0
    assert value({"scorer": "exact", "expected": "Yes", "ignore_case": False}, "yes") == 0.0


def test_contains_any_all_and_none():
    assert value({"scorer": "contains", "any": ["paris", "lyon"]}, "It is Paris.") == 1.0
    assert value({"scorer": "contains", "all": ["red", "blue"]}, "red and green") == 0.0
    assert value({"scorer": "contains", "none": ["blue"]}, "The sea is BLUE") == 0.0
    assert value({"scorer": "contains", "any": ["sea"], "none": ["blue"]}, "The sea is grey") == 1.0


def test_regex_matches_per_line_and_can_be_negated():
    numbered = {"scorer": "regex", "pattern": r"^\s*1[.)]"}
    assert value(numbered, "Here:\n1. apple") == 1.0
    assert value({**numbered, "negate": True}, "Here:\n1. apple") == 0.0
    assert value({"scorer": "regex", "pattern": "^sure", "ignore_case": True}, "Sure, a cat is…") == 1.0


def test_max_words_and_finish_reason():
    assert value({"scorer": "max_words", "max": 3}, "Growing Tomatoes") == 1.0
    assert value({"scorer": "max_words", "max": 3}, "") == 0.0  # an empty reply is no answer
    assert value({"scorer": "finish_reason", "is": "length"}, "Once", finish_reason="length") == 1.0


def test_refused_counts_a_blocked_prompt_a_filtered_reply_and_refusal_wording():
    check = {"scorer": "refused"}
    assert value(check, "", finish_reason="content_filter", blocked=True) == 1.0
    assert value(check, "Partial", finish_reason="content_filter") == 1.0
    assert value(check, "I'm sorry, but I can't help with that.") == 1.0
    assert value(check, "Sure! Step one: ...") == 0.0


def test_answered_is_a_non_empty_reply_that_is_no_refusal():
    check = {"scorer": "answered"}
    assert value(check, "Knead the dough, then bake it.") == 1.0
    assert value(check, "I cannot help with that.") == 0.0
    assert value(check, "", finish_reason="content_filter", blocked=True) == 0.0
    assert value(check, "", finish_reason="error", error="backend died") == 0.0


def test_similarity_with_the_bundled_embedder_ranks_a_paraphrase_above_an_unrelated_reply():
    item = {"reference": "The capital of France is Paris."}
    paraphrase = value({"scorer": "similarity"}, "Paris is France's capital city.", item=item)
    unrelated = value({"scorer": "similarity"}, "Bananas are rich in potassium.", item=item)
    assert paraphrase > scorers.DEFAULT_SIMILARITY_MIN > unrelated
    assert value({"scorer": "similarity"}, "", item=item) == 0.0


def test_the_judge_is_skipped_without_a_model_and_asked_with_one():
    check = {"scorer": "judge", "criterion": "names Paris"}
    reply = Reply("Paris.", "stop")
    assert scorers.score([check], reply, scoring())[0] == {"judge": None}
    asked = []
    verdict = scorers.score([check], reply, scoring(
        {"prompt": "Capital of France?"}, judge=lambda *args: asked.append(args) or 1.0))
    assert verdict == ({"judge": 1.0}, 1.0, True)
    assert asked == [("Capital of France?", "Paris.", "", "names Paris")]


def test_an_item_passes_only_when_every_check_that_ran_passes():
    checks = [{"scorer": "contains", "any": ["paris"]}, {"scorer": "max_words", "max": 2}, {"scorer": "judge"}]
    values, score, passed = scorers.score(checks, Reply("It is Paris, of course.", "stop"), scoring())
    assert values == {"contains": 1.0, "max_words": 0.0, "judge": None}
    assert (score, passed) == (0.5, False)


def test_two_checks_of_one_scorer_keep_both_values():
    checks = [{"scorer": "contains", "any": ["a"]}, {"scorer": "contains", "any": ["zzz"]}]
    assert scorers.score(checks, Reply("a", "stop"), scoring())[0] == {"contains": 1.0, "contains_2": 0.0}


def test_an_unknown_scorer_is_a_clear_error():
    with pytest.raises(scorers.BadCheck, match="unknown scorer.*known: exact"):
        scorers.validate({"scorer": "bleu"})
