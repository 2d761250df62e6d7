from django.urls import path

from sharing import views

urlpatterns = [
    path("c/<uuid:conversation_id>/share", views.share_create, name="share_create"),
    path("shares/", views.share_list, name="share_list"),
    path("shares/<uuid:share_id>/revoke", views.share_revoke, name="share_revoke"),
    path("s/<str:token>/", views.share_view, name="share_view"),
    path("s/<str:token>/continue", views.share_continue, name="share_continue"),
]
