from django.urls import path

from feedback import views

urlpatterns = [
    path("m/<uuid:message_id>/feedback", views.reply_feedback, name="reply_feedback"),
]
