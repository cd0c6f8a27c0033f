"""The one exception type users see: a message that names the problem and where it is."""


class CleantuneError(Exception):
    """Bad input or an impossible request. The CLI prints its message alone, without a traceback."""
