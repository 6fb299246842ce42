"""The example project's URLs: the admin, with its "Locks" page (`manage.py runserver`)."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
