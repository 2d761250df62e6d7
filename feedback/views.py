"""The rating widget under each finished reply (htmx swaps it in place)."""
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from feedback import selectors, services
from feedback.models import Feedback


def _widget(request, message, feedback, *, error: str = "", status: int = 200):
    context = {"m": message, "fb": feedback, "categories": Feedback.Category.choices,
               "error": error, "just_rated": feedback is not None and status == 200}
    return render(request, "feedback/_widget.html", context, status=status)


@login_required
@require_POST
def reply_feedback(request, message_id):
    """Set (or change) the user's rating of one of their replies; rating=clear removes it."""
    try:
        message = services.access_reply(user=request.user, message_id=message_id)
    except services.FeedbackError as exc:
        return HttpResponse(format_html('<p class="feedback-error" role="alert">{}</p>', exc), status=422)
    try:
        if request.POST.get("rating") == "clear":
            services.feedback_clear(user=request.user, message=message)
            return _widget(request, message, None)
        feedback = services.feedback_set(
            user=request.user, message=message, rating=request.POST.get("rating"),
            category=request.POST.get("category", ""), comment=request.POST.get("comment", ""),
        )
    except services.FeedbackError as exc:
        current = selectors.feedback_of(user=request.user, message=message)
        return _widget(request, message, current, error=str(exc), status=422)
    return _widget(request, message, feedback)
