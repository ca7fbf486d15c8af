"""Error wording shared by the trainers: the first line of a library error, the reason of an OSError, and an OSError
that keeps its errno (ENOSPC, EACCES, ...) under a message that says what was kept and what to do."""

__all__ = ['first_line', 'os_error', 'reason']


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def reason(e: BaseException) -> str:
    """'No space left on device' for an OSError (the caller names the path), else the first line."""
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def os_error(e: BaseException, message: str) -> OSError:
    code = getattr(e, 'errno', None)
    return OSError(code, message) if code is not None else OSError(message)
