from django import template
from django.utils.html import escape
from django.utils.safestring import mark_safe

from conversations.rendering import render_markdown
from conversations.routing import STREAM_PATH

register = template.Library()


@register.filter
def markdown(text: str):
    # render_markdown sanitizes its final HTML with nh3: safe to mark.
    return mark_safe(render_markdown(text or ""))


@register.filter
def safe_snippet(text: str):
    """SearchHeadline output with \\x02/\\x03 match markers: escape everything,
    then turn only the markers into <mark>."""
    return mark_safe(escape(text or "").replace("\x02", "<mark>").replace("\x03", "</mark>"))


@register.simple_tag
def stream_url(message) -> str:
    return "/" + STREAM_PATH.format(reply_id=message.id)
