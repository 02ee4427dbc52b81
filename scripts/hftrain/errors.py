"""Mistakes a user can make stop the run early with one sentence that says what to do."""


class UserError(SystemExit):
    """Exits with status 1 and prints 'error: <message>' instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def cause_of(error: BaseException) -> str:
    """An exception as a message names it: its type and the first line of its text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else type(error).__name__
