"""Mistakes a user can make stop the run early with one sentence that says what to do."""


class UserError(SystemExit):
    """Exits with status 1 and prints 'error: <message>' instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
