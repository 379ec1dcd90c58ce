"""Errors a user can cause. The CLI prints their message on one line and exits 2;
the REST server turns them into 4xx responses. Anything else is a bug."""


class TpserveError(Exception):
    """Base of every user-facing error; its message says what to do."""


class ConfigError(TpserveError):
    """A bad flag, option or config value."""


class ModelFormatError(TpserveError):
    """Missing or corrupt model files, or an unsupported architecture."""


class RequestError(TpserveError):
    """A request the engine cannot serve (prompt too long, bad sampling values)."""
