"""The one exception type for mistakes a user can fix."""


class UserError(ValueError):
    """A bad input the user can fix: the CLI prints the message on one line and exits 2.

    The message names the offending field or file and says how to fix it.
    Subclasses ValueError so library callers can catch it the usual way.
    """
