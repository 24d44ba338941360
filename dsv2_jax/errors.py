"""Errors that are the user's to fix (bad input, a run that cannot go on): the CLI prints
their message as one line and exits 1, with no traceback."""


class UserError(Exception):
    pass
