"""Hybrid search: vector and full-text rankings merged by reciprocal rank fusion."""
import pytest

from documents import selectors
from documents.selectors import Scope, fuse
from retrieval.services import embed

pytestmark = pytest.mark.django_db

PASSAGES = {
    "longbourn.txt": "Mr. Bennet and his wife live at Longbourn, an estate in Hertfordshire, with their five daughters.",
    "pemberley.txt": "Pemberley is Mr. Darcy's great house in Derbyshire, with a large park and a famous library.",
    "wickham.txt": "George Wickham is an officer in the militia, charming to everyone, and deeply in debt.",
    "codes.txt": "Entail code XK-4471 governs the Longbourn estate.",
}


@pytest.fixture
def library(alice, upload):
    return {name: upload(alice, name, text.encode()) for name, text in PASSAGES.items()}


def _search(user, query, mode="hybrid", conversation_id=None):
    scope = Scope(user_id=user.id, conversation_id=conversation_id, use_library=True)
    return [h.document for h in selectors.search(scope=scope, query=query, vector=embed([query])[0], mode=mode)]


def test_fusion_rewards_agreement_between_rankings():
    assert [i for i, _ in fuse([1, 2, 3], [2, 4, 5])][:3] == [2, 1, 4]
    assert fuse([], [7]) == [(7, 1 / 61)]


def test_vector_search_finds_a_paraphrase_full_text_cannot(alice, library):
    query = "Which soldier owes money?"
    assert _search(alice, query, "vector")[0] == "wickham.txt"
    assert "wickham.txt" not in _search(alice, query, "text")
    assert _search(alice, query)[0] == "wickham.txt"


def test_full_text_finds_an_exact_code_vectors_blur(alice, library):
    assert _search(alice, "XK-4471", "text") == ["codes.txt"]
    assert _search(alice, "XK-4471")[0] == "codes.txt"


def test_hybrid_ranks_first_what_both_rankings_agree_on(alice, library):
    assert _search(alice, "Where is Mr. Darcy's house?")[0] == "pemberley.txt"


def test_a_small_scope_in_a_large_table_still_gets_its_results(alice, bob, upload, library):
    # bob's many chunks fill the HNSW neighbourhood; alice's scope is a few rows.
    for i in range(30):
        upload(bob, f"b{i}.txt", f"Mr. Bennet at Longbourn, copy {i}.".encode())
    assert _search(alice, "Longbourn estate", "vector")[:2] != []
    assert len(_search(alice, "Mr. Bennet Longbourn", "vector")) == 4
