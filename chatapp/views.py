from asgiref.sync import sync_to_async
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from chatapp import health


@require_GET
async def healthz(request):
    ok, report = await sync_to_async(health.check_all)()
    return JsonResponse(report, status=200 if ok else 503)
