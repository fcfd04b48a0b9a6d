"""Errors a user can cause and fix.

Every error raised because of user input (a path, a config value, a dataset) is an ``HclsmError``
whose message names the thing at fault and the fix. The CLI prints it on one line and exits 2,
without a traceback; library callers can catch it like any exception.
"""
from __future__ import annotations


import re

_LONG_NUMBER = re.compile(r"\d{40,}")  # a user can type 400 digits; a one-line message should not repeat them


class HclsmError(Exception):
    """Base class of errors caused by user input; the message says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: object = "", *args: object):
        if isinstance(message, str):
            message = _LONG_NUMBER.sub(lambda m: f"<a {len(m.group())}-digit number>", message)
        super().__init__(message, *args)


class ConfigError(HclsmError):
    """A config key, type or value is invalid."""


class DataError(HclsmError):
    """A dataset is missing, unreadable, corrupt or does not have what was asked of it."""
