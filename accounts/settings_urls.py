"""The account's settings pages, mounted at /settings/ (the paths the README
and users' bookmarks know), apart from the /accounts/ auth pages."""
from django.urls import path

from accounts import views

urlpatterns = [
    path("usage/", views.usage, name="usage"),
    path("api-keys/", views.api_keys, name="api_keys"),
    path("api-keys/<int:key_id>/revoke/", views.api_key_revoke, name="api_key_revoke"),
]
