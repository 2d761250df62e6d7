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
    path("", include("gateway.urls")),
    path("", include("conversations.urls")),
]
