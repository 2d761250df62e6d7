from django.contrib import admin
from django.urls import include, path

from chatapp import views
from observability import views as observability_views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("metrics", observability_views.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("accounts/", include("accounts.urls")),
    path("settings/", include("accounts.settings_urls")),
    path("documents/", include("documents.urls")),
    path("", include("gateway.urls")),
    path("", include("conversations.urls")),
    path("", include("feedback.urls")),
    path("", include("dashboard.urls")),
    path("memory/", include("memory.urls")),
    path("", include("sharing.urls")),
]
