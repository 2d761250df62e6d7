from django.urls import path

from documents import views

urlpatterns = [
    path("", views.library, name="documents_library"),
    path("upload", views.library_upload, name="documents_upload"),
    path("<uuid:document_id>/row", views.document_row, name="document_row"),
    path("<uuid:document_id>/delete", views.document_delete, name="document_delete"),
    path("passages/<int:chunk_id>/", views.passage, name="document_passage"),
    path("c/<uuid:conversation_id>/files", views.chat_files, name="chat_files"),
    path("c/<uuid:conversation_id>/upload", views.chat_upload, name="chat_upload"),
    path("c/<uuid:conversation_id>/library", views.chat_library, name="chat_library"),
    path("c/<uuid:conversation_id>/sources", views.chat_sources, name="chat_sources"),
]
