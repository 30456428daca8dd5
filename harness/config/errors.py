"""The one exception type for bad input, and the first line of an error for one-line messages."""


class HarnessError(Exception):
    """Bad input: the message names the bad value and what would be right."""


class Inapplicable(HarnessError):
    """The method cannot explain the model (an attention method on a CNN): with `skip_inapplicable`,
    a sweep's job records it (`not_applicable.txt`) instead of failing.
    """


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first non-blank line of an error's text (at most `limit` characters); an exception with no
    text gives its type's name.
    """
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return lines[0][:limit]


class MissingFile(HarnessError, FileNotFoundError):
    """A path in the config that names no file."""
