from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SafetyConfig(AppConfig):
    name = "safety"

    def ready(self):
        from safety.taxonomy import CATEGORIES

        unknown = [c for c in settings.SAFETY_FAIL_CLOSED if c not in CATEGORIES]
        if unknown:
            raise ImproperlyConfigured(f"SAFETY_FAIL_CLOSED names unknown categories {unknown}; known: {list(CATEGORIES)}")
