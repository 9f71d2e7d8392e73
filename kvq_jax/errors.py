"""One exception type for every failure a user can cause (bad file, bad option, bad plan)."""


class KvqError(Exception):
    """A user-facing error. Its message is one line; the CLI prints it and exits with status 2."""
