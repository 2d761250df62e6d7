from django.urls import path, re_path

from gateway import api, views

urlpatterns = [
    path("v1/chat/completions", api.chat_completions, name="v1_chat_completions"),
    path("v1/models", api.models, name="v1_models"),
    path("v1/models/<str:model_id>", api.models, name="v1_model"),
    re_path(r"^v1/(?P<rest>.*)$", api.not_found),
    path("settings/usage/", views.usage, name="usage"),
    path("settings/api-keys/", views.api_keys, name="api_keys"),
    path("settings/api-keys/<int:key_id>/revoke/", views.api_key_revoke, name="api_key_revoke"),
]
