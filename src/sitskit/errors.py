"""Errors that reach the user as one clear line (file/patch/key and what is wrong) and exit code 2."""


class UserFacingError(Exception):
    """Bad input or a refused operation; the message names the file/patch/key and the problem."""
