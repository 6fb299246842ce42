"""Optional apps that build on django-isolatable; each is listed in INSTALLED_APPS on its own."""
