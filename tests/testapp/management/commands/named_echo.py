from tests.testapp.management.commands import isolated_echo


class Command(isolated_echo.Command):
    isolation_name = "custom-name"
