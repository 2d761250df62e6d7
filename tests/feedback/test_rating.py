"""Rating a reply: create, change, clear; only the reply's owner; bad input is refused and loses nothing."""
from conversations.models import Message
from feedback.models import Feedback
from tests.feedback.conftest import make_thread


def rate(client, reply, **data):
    return client.post(f"/m/{reply.id}/feedback", data, HTTP_HX_REQUEST="true")


def test_a_user_rates_a_reply_then_changes_the_rating_with_a_category_and_comment(alice_client, alice, thread):
    _, _, reply = thread
    response = rate(alice_client, reply, rating="up")
    assert response.status_code == 200
    assert 'aria-label="Good reply" aria-pressed="true"' in response.content.decode()
    feedback = Feedback.objects.get()
    assert (feedback.user, feedback.message, feedback.rating, feedback.model) == (alice, reply, 1, "small")

    response = rate(alice_client, reply, rating="down", category="too_long", comment="  Far too wordy.  ")
    assert response.status_code == 200
    feedback = Feedback.objects.get()  # still one per user per reply
    assert (feedback.rating, feedback.category, feedback.comment) == (-1, "too_long", "Far too wordy.")
    assert 'value="too_long" selected' in response.content.decode()


def test_a_rating_can_be_removed(alice_client, thread):
    _, _, reply = thread
    rate(alice_client, reply, rating="up")
    assert rate(alice_client, reply, rating="clear").status_code == 200
    assert not Feedback.objects.exists()


def test_another_users_reply_is_404_and_nothing_is_stored(bob_client, thread):
    _, _, reply = thread
    assert rate(bob_client, reply, rating="down").status_code == 404
    assert not Feedback.objects.exists()


def test_an_unknown_reply_is_404(alice_client):
    assert alice_client.post("/m/00000000-0000-0000-0000-000000000000/feedback", {"rating": "up"}).status_code == 404


def test_signed_out_visitors_are_sent_to_log_in(client, thread):
    _, _, reply = thread
    response = rate(client, reply, rating="up")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert not Feedback.objects.exists()


def test_bad_input_gets_a_clear_422_and_keeps_the_previous_rating(alice_client, thread):
    _, _, reply = thread
    rate(alice_client, reply, rating="up", comment="good")
    for data, words in [
        ({"rating": "sideways"}, "thumbs up or thumbs down"),
        ({"rating": "down", "category": "rude"}, "Unknown category"),
        ({"rating": "down", "comment": "x" * 4001}, "the limit is 4,000"),
        ({"rating": "down", "comment": "a\x00b"}, "NUL"),
    ]:
        response = rate(alice_client, reply, **data)
        assert response.status_code == 422 and words in response.content.decode(), data
    feedback = Feedback.objects.get()
    assert (feedback.rating, feedback.comment) == (1, "good")


def test_only_finished_replies_can_be_rated(alice_client, alice):
    _, question, pending = make_thread(alice, status=Message.Status.STREAMING)
    response = rate(alice_client, pending, rating="up")
    assert response.status_code == 422 and "Wait for the reply to finish" in response.content.decode()
    response = rate(alice_client, question, rating="up")
    assert response.status_code == 422 and "Only replies" in response.content.decode()
    assert not Feedback.objects.exists()


def test_the_chat_page_shows_the_widget_with_the_current_rating_and_no_inline_script(alice_client, thread):
    conversation, _, reply = thread
    rate(alice_client, reply, rating="down")
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert f'hx-post="/m/{reply.id}/feedback"' in html
    assert 'aria-label="Bad reply" aria-pressed="true"' in html
    assert "onclick" not in html


def test_an_unfinished_reply_renders_its_widget_hidden(alice_client, alice):
    conversation, _, pending = make_thread(alice, status=Message.Status.STREAMING)
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert f'hx-post="/m/{pending.id}/feedback" hx-target="this" hx-swap="outerHTML" hidden' in html
