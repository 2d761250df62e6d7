from django.urls import path

from memory import views

urlpatterns = [
    path("", views.memory_list, name="memory_list"),
    path("add", views.memory_add, name="memory_add"),
    path("settings", views.memory_settings, name="memory_settings"),
    path("<uuid:memory_id>/accept", views.memory_accept, name="memory_accept"),
    path("<uuid:memory_id>/edit", views.memory_edit, name="memory_edit"),
    path("<uuid:memory_id>/delete", views.memory_delete, name="memory_delete"),
]
