"""The one exception type for errors a user can cause and fix."""


class GenreclfError(Exception):
    """A user-caused problem (bad file, bad argument, wrong model); the message says what to do."""


class AudioError(GenreclfError):
    """An audio file is missing, empty, corrupt or not audio; `details` keeps what the decoders said."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details  # the decoders' own messages, for -v: too technical for the one-line message

    def __reduce__(self):  # keep `details` across processes (Exception pickles only args)
        return type(self), (str(self), self.details)


def first_line(error: BaseException, limit: int | None = 120) -> str:
    """Return the first line of an error's message (its type name if empty), cut to `limit` characters."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if limit is None else line[:limit]
