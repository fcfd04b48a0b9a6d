"""Errors a user can cause and fix.

Every error raised because of user input (a path, a config value, a dataset) is an ``HclsmError``
whose message names the thing at fault and the fix. The CLI prints it on one line and exits 2,
without a traceback; library callers can catch it like any exception.
"""
from __future__ import annotations


class HclsmError(Exception):
    """Base class of errors caused by user input; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(HclsmError):
    """A config key, type or value is invalid."""


class DataError(HclsmError):
    """A dataset is missing, unreadable, corrupt or does not have what was asked of it."""
