"""`GET /metrics`: the Prometheus text format, for loopback or a bearer token."""
from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import Http404, HttpResponse
from django.views.decorators.http import require_GET

from observability import exposition

# A request relayed by a proxy on this box arrives from loopback too: any of
# these headers means someone else is asking, who must show the token.
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


@require_GET
def metrics(request):
    """404, not 401/403, to a caller without access: the endpoint is not advertised."""
    if not settings.METRICS_ENABLED or not _may_scrape(request):
        raise Http404("Not found")
    return HttpResponse(exposition.render(), content_type=exposition.CONTENT_TYPE)


def _may_scrape(request) -> bool:
    if _from_loopback(request):
        return True
    token = settings.METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _from_loopback(request) -> bool:
    if any(request.META.get(header) for header in PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False
