"""Memory in the chat's templates: a reply's "used N memories" disclosure and
the on/off switch on the Custom instructions page (the chat's views stay
unaware of memory)."""
from django import template

from memory import selectors

register = template.Library()


@register.simple_tag
def memory_uses(branch) -> dict:
    """reply id → ReplyMemories for a thread's messages, in one query."""
    ids = [item.message.id for item in branch if item.message.role == "assistant"]
    return selectors.uses_for_replies(reply_ids=ids) if ids else {}


@register.filter
def uses_of(uses: dict, message):
    return (uses or {}).get(message.id)


@register.inclusion_tag("memory/_switch.html", takes_context=True)
def memory_switch(context) -> dict:
    user = context["request"].user
    return {"enabled": selectors.memory_enabled(user_id=user.id), "csrf_token": context.get("csrf_token")}
