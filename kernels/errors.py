"""The root of lens's error hierarchy.

It lives at the bottom layer so that pure-torch kernels can reject bad configurations with the same
``LensError`` that users catch from ``lens`` (which re-exports these), without importing ``lens``.
"""


class LensError(Exception):
    """Base class of every error lens raises on purpose; the message says what to do about it."""


class ConfigError(LensError, ValueError):
    """An argument or configuration is outside its valid range; the message names the range."""
