from django.apps import AppConfig


class IsolatableConfig(AppConfig):
    name = "django_isolatable"
    verbose_name = "Isolatable commands"

    def ready(self) -> None:
        from django_isolatable import checks  # noqa: F401 - registers the system checks
