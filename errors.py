"""The one exception of the project: every file raises it, every script prints it as one sentence."""


class UserError(ValueError):
    """A problem the user can fix (a file, a record, a setting): every script of the project prints
    it as one sentence that says what is wrong and what to do, without a traceback."""
