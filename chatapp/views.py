import ipaddress

from asgiref.sync import sync_to_async
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from audit.net import client_ip
from chatapp import health


@require_GET
async def healthz(request):
    ok, report = await sync_to_async(health.check_all)()
    if not ipaddress.ip_address(client_ip(request)).is_loopback:
        try:
            user = await request.auser()
        except Exception:  # the session store (Redis) may be what is down
            user = None
        if not (user is not None and user.is_active and user.is_staff):
            report = health.public_report(report)
    return JsonResponse(report, status=200 if ok else 503)
