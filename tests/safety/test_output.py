"""Replies: the rules gate every token, the classifiers read the reply as it
grows and whole at its end; nothing of a blocked reply is kept."""
import pytest

from safety.services import OutputWindow
from tests.safety import fakes

pytestmark = pytest.mark.django_db(transaction=True)


async def _stream(window, pieces):
    shown = ""
    for piece in pieces:
        shown += await window.apush(piece)
    return shown + await window.aflush()


async def test_an_obfuscated_term_split_across_tokens_never_shows(settings):
    settings.SAFETY_BLOCKED_TERMS = ["secret"]
    window = OutputWindow()
    shown = await _stream(window, ["Here is the ", "s e", " c r", " e t", " plan"])
    assert window.verdict.blocked and window.verdict.category == "blocked_term"
    assert "Here is the".startswith(shown)  # nothing of the term, spaced out or not


async def test_a_clean_reply_comes_out_whole(settings):
    settings.SAFETY_BLOCKED_TERMS = ["secret"]
    pieces = ["The ", "weather ", "is ", "fine ", "today."]
    window = OutputWindow()
    assert await _stream(window, pieces) == "".join(pieces) and not window.verdict.flagged


async def test_with_no_terms_nothing_is_held_back():
    window = OutputWindow()
    assert await window.apush("Hello") == "Hello" and not window.active


async def test_the_classifiers_read_the_growing_reply(settings):
    settings.SAFETY_OUTPUT_CHECK_CHARS = 10
    fakes.MARKERS["output"] = "stab"
    window = OutputWindow(user_id=None)
    shown = await _stream(window, ["First you take the knife ", "and then you stab", " them", " again"])
    assert window.verdict.blocked and "stab" not in shown and "again" not in shown


async def test_the_whole_message_check_catches_what_no_window_did(settings, blocked_signals):
    fakes.MARKERS["output"] = "alpha omega"  # only the whole reply holds it
    window = OutputWindow(user_id=7)
    # What streamed already is replaced by the notice on the page (turns.settle); the tail is not released.
    assert await window.apush("alpha ") == "alpha "
    assert await window.apush("omega") == "omega"
    assert await window.aflush() == ""
    assert window.verdict.blocked and "content policy" in window.verdict.reason
    assert [(s["source"], s["user_id"], s["text"]) for s in blocked_signals] == [("output", 7, "alpha omega")]


@pytest.fixture
def classifier_reads(monkeypatch):
    """Every text the window hands the classifiers, in order."""
    from safety import pipeline

    read = []
    real = pipeline.arun

    async def recording(texts, *, source):
        read.extend(texts)
        return await real(texts, source=source)

    monkeypatch.setattr(pipeline, "arun", recording)
    return read


async def test_the_classifiers_read_every_character_of_a_long_reply_at_most_twice(settings, classifier_reads):
    settings.SAFETY_OUTPUT_CHECK_CHARS = 400
    read = classifier_reads
    words = [f"word{i:04d} " for i in range(600)]  # 6000 characters, streamed a word at a time
    reply = "".join(words)
    assert await _stream(OutputWindow(), words) == reply
    assert all(text in reply for text in read)
    covered = [False] * len(reply)
    for text in read:
        start = reply.index(text)
        covered[start:start + len(text)] = [True] * len(text)
    assert all(covered), "a part of the reply was never classified"
    # Before, each check reread the last 500 characters and the end reread it all: about 3x.
    assert sum(map(len, read)) <= 2 * len(reply)


@pytest.mark.parametrize("every", [400, 150])
async def test_the_reply_floor_bench_replays_what_the_window_reads(settings, classifier_reads, every):
    """bench.reply_floor's floor holds only if it times what a reply's window
    really hands the classifiers, mid-stream and at the end."""
    from bench import reply_floor, sse_stub

    settings.SAFETY_OUTPUT_CHECK_CHARS = every
    read = classifier_reads
    pieces = sse_stub.reply_pieces(5, 128)
    window = OutputWindow()
    for piece in pieces:
        await window.apush(piece)
    mid_done = len(read)
    await window.aflush()
    mid, final = reply_floor.reads(pieces, reply_floor.Plan("today", None, None))
    assert read[:mid_done] == mid and read[mid_done:] == final
    assert len(mid) >= 1 and len(final) == 1  # the replay is not vacuous: both kinds of read happen
