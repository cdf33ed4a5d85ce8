"""The one exception type for every data problem."""


class DataError(ValueError):
    """A data problem; the message names the file, folder or row and what is wrong."""
