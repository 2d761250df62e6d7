"""`{% feedback_widget m %}`: the rating widget under a reply in the chat thread.

The thread template renders many replies; the first widget loads the ratings
of the whole conversation in one query and keeps them for the rest of the
render (render_context lives for one template rendering)."""
from django import template

from feedback.models import Feedback
from feedback.selectors import feedback_of_conversation

register = template.Library()


@register.inclusion_tag("feedback/_widget.html", takes_context=True)
def feedback_widget(context, message):
    base = {"m": message, "fb": None, "categories": Feedback.Category.choices}
    if not message.is_terminal:
        return base  # a reply still generating has no rating: no query on the send path
    key = ("feedback", message.conversation_id)
    ratings = context.render_context.get(key)
    if ratings is None:
        user = context.get("user") or getattr(context.get("request"), "user", None)
        user_id = getattr(user, "id", None)
        ratings = feedback_of_conversation(user_id=user_id, conversation_id=message.conversation_id) if user_id else {}
        context.render_context[key] = ratings
    return {**base, "fb": ratings.get(message.id)}
