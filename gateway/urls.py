from django.urls import path, re_path

from gateway import api

urlpatterns = [
    path("v1/chat/completions", api.chat_completions, name="v1_chat_completions"),
    path("v1/embeddings", api.embeddings, name="v1_embeddings"),
    path("v1/moderations", api.moderations, name="v1_moderations"),
    path("v1/openapi.json", api.openapi_json, name="v1_openapi"),
    path("v1/models", api.models, name="v1_models"),
    path("v1/models/<str:model_id>", api.models, name="v1_model"),
    re_path(r"^v1/(?P<rest>.*)$", api.not_found),
]
