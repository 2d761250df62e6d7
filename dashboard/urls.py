from django.urls import path

from dashboard import views

urlpatterns = [
    path("staff/dashboard/", views.dashboard, name="dashboard"),
    path("staff/dashboard/engines", views.engines, name="dashboard_engines"),
]
