"""The one exception type for bad input."""


class HarnessError(Exception):
    """Bad input: the message names the bad value and what would be right."""
