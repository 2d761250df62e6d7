from django.urls import path

from conversations import views

urlpatterns = [
    path("", views.home, name="home"),
    path("c/new", views.conversation_new, name="conversation_new"),
    path("c/sidebar", views.sidebar, name="sidebar"),
    path("c/archived/", views.archived, name="archived"),
    path("c/search/", views.search, name="search"),
    path("c/preferences/", views.preferences, name="chat_preferences"),
    path("c/code.css", views.code_css, name="code_css"),
    path("c/<uuid:conversation_id>/", views.conversation_page, name="conversation"),
    path("c/<uuid:conversation_id>/send", views.message_send, name="message_send"),
    path("c/<uuid:conversation_id>/rename", views.conversation_rename, name="conversation_rename"),
    path("c/<uuid:conversation_id>/settings", views.conversation_settings, name="conversation_settings"),
    path("c/<uuid:conversation_id>/archive", views.conversation_archive, name="conversation_archive"),
    path("c/<uuid:conversation_id>/delete", views.conversation_delete, name="conversation_delete"),
    path("c/<uuid:conversation_id>/export.<str:fmt>", views.conversation_export, name="conversation_export"),
    path("m/<uuid:message_id>/edit", views.message_edit, name="message_edit"),
    path("m/<uuid:message_id>/regenerate", views.message_regenerate, name="message_regenerate"),
    path("m/<uuid:message_id>/stop", views.message_stop, name="message_stop"),
    path("m/<uuid:message_id>/switch", views.branch_switch, name="branch_switch"),
    path("m/<uuid:message_id>/remember", views.message_save_to_memory, name="message_save_to_memory"),
]
