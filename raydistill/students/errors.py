"""The one error of the students package."""


class StudentError(RuntimeError):
    """A student cannot be found, built or downloaded; the message says what to do."""
