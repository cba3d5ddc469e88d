"""The one exception type ckptbend raises for anything a user can fix."""


class CkptbendError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
