from django.apps import AppConfig
from django.conf import settings
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string


class ChatappConfig(AppConfig):
    name = "chatapp"
    verbose_name = "Chat app core"

    def ready(self):
        run_djangos_middleware_in_one_block(settings.MIDDLEWARE)


# django-csp's middleware is a MiddlewareMixin like Django's own, with the same cost.
ONE_BLOCK = ("django.", "csp.")


def run_djangos_middleware_in_one_block(paths) -> None:
    """Declare Django's own middleware classes sync-only (Django ticket #37177,
    which makes this same change in Django itself).

    They are `MiddlewareMixin`s that call themselves async-capable, but under
    ASGI `MiddlewareMixin.__acall__` runs each `process_request` and
    `process_response` through `sync_to_async`: a thread hop and back for
    each, a dozen per request with our stack, each one a future, a thread
    wake-up, a loop wake-up and a turn at the GIL that the engine's step is
    waiting for. Sync-only, a run of them is adapted once and they call each
    other directly on the request's thread, which is what they do under WSGI.
    Their behaviour is unchanged, and so are their dotted paths in MIDDLEWARE,
    which Django's deployment checks look for."""
    for path in paths:
        cls = import_string(path)
        if isinstance(cls, type) and issubclass(cls, MiddlewareMixin) and cls.__module__.startswith(ONE_BLOCK):
            cls.async_capable = False
