"""Exceptions of the us3d logic layer."""


class InputError(ValueError):
    """Bad user input (file, volume or parameter); the message is meant for the user as is."""


class Cancelled(Exception):
    """The user cancelled a running job; nothing was produced."""
