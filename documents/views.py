"""Document pages: the library, a chat's files and sources, the passage view.

Thin: authorize (`selectors.access_*`, 404 for anything not the user's),
call one service or selector, render. Upload errors answer 422 with the
message, which htmx swaps into the form's error slot.
"""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.utils.html import escape
from django.views.decorators.http import require_GET, require_POST

from documents import selectors, services


def _upload_error(message: str, target: str) -> HttpResponse:
    response = HttpResponse(escape(message), status=422, content_type="text/plain; charset=utf-8")
    response["HX-Retarget"] = target
    response["HX-Reswap"] = "innerHTML"
    return response


def _upload(request, conversation_id=None):
    """Each file on its own: a refused one is reported, the others are stored."""
    files = request.FILES.getlist("file")
    if not files:
        raise ValidationError("Choose a file to upload.")
    errors = []
    for upload in files:
        try:
            services.check_size(name=upload.name, size=upload.size)
            services.document_upload(user=request.user, name=upload.name, data=upload.read(),
                                     conversation_id=conversation_id)
        except ValidationError as exc:
            errors.extend(exc.messages)
    if errors:
        raise ValidationError(errors)


@login_required
@require_GET
def library(request):
    return render(request, "documents/library.html", {
        "documents": selectors.library(user=request.user),
        "used_bytes": selectors.storage_used_bytes(user=request.user),
        "quota_bytes": int(settings.DOCUMENTS_USER_QUOTA_MB * 2**20),
    })


@login_required
@require_POST
def library_upload(request):
    try:
        _upload(request)
    except ValidationError as exc:
        return _upload_error(" ".join(exc.messages), "#upload-error")
    if request.htmx:
        return render(request, "documents/_doc_list.html", {"documents": selectors.library(user=request.user)})
    return redirect("documents_library")


@login_required
@require_GET
def document_row(request, document_id):
    document = selectors.access_document(user=request.user, document_id=document_id)
    return render(request, "documents/_doc_row.html", {"d": document})


@login_required
@require_POST
def document_delete(request, document_id):
    document = selectors.access_document(user=request.user, document_id=document_id)
    services.document_delete(document=document)
    if request.htmx:
        return HttpResponse("")
    return redirect("documents_library")


@login_required
@require_GET
def chat_files(request, conversation_id):
    selectors.access_conversation_id(user=request.user, conversation_id=conversation_id)
    return _chat_files(request, conversation_id)


def _chat_files(request, conversation_id):
    return render(request, "documents/_chat_files.html", {
        "conversation_id": conversation_id,
        "documents": selectors.attachments(user=request.user, conversation_id=conversation_id),
        "use_library": selectors.use_library(conversation_id=conversation_id),
    })


@login_required
@require_POST
def chat_upload(request, conversation_id):
    selectors.access_conversation_id(user=request.user, conversation_id=conversation_id)
    try:
        _upload(request, conversation_id)
    except ValidationError as exc:
        return _upload_error(" ".join(exc.messages), "#attach-error")
    return _chat_files(request, conversation_id)


@login_required
@require_POST
def chat_library(request, conversation_id):
    selectors.access_conversation_id(user=request.user, conversation_id=conversation_id)
    services.chat_use_library(conversation_id=conversation_id, on=request.POST.get("use_library") == "1")
    return _chat_files(request, conversation_id)


@login_required
@require_GET
def chat_sources(request, conversation_id):
    """Every reply's sources panel in one response (htmx out-of-band swaps
    into the slots `_message.html` leaves), so a thread costs one request."""
    selectors.access_conversation_id(user=request.user, conversation_id=conversation_id)
    return render(request, "documents/_chat_sources.html", {
        "sources": selectors.reply_sources(user=request.user, conversation_id=conversation_id)})


@login_required
@require_GET
def passage(request, chunk_id):
    chunk = selectors.access_chunk(user=request.user, chunk_id=chunk_id)
    text = selectors.page_text(chunk=chunk)
    found = text[chunk.start:chunk.end] == chunk.text
    return render(request, "documents/passage.html", {
        "chunk": chunk, "document": chunk.document, "found": found,
        "before": text[:chunk.start] if found else "", "after": text[chunk.end:] if found else "",
    })
