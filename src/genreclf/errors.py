"""The one exception type for errors a user can cause and fix."""


class GenreclfError(Exception):
    """A user-caused problem (bad file, bad argument, wrong model); the message says what to do."""


class AudioError(GenreclfError):
    """An audio file is missing, empty, corrupt or not audio."""
