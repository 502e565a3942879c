"""The one exception type the command line reports without a traceback."""


class UserError(Exception):
    """A problem the user can fix (a config value, a file, the disk). The message is one line naming what is
    wrong and the fix; `python -m ssl_zoo.run` prints it as `error: <message>` and exits non-zero."""
