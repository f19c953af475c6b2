"""Errors a user can fix.

Every error that bad input can cause (a manifest typo, a missing data set, a wrong checkpoint) is a
:class:`UserError`. The command line prints its message as one line on stderr and exits with code 2,
without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error the user can fix; the CLI prints ``str(e)`` on one line and exits 2.

    The message says what is wrong, where (file, field or path) and how to fix it.
    """
