"""Errors of the public surface. `FabricError` is the base of all of them."""


class FabricError(Exception):
    """Base class of every error the fabric raises on purpose."""


class ConfigError(FabricError):
    """A bad configuration. The message names the field, e.g. `instances.kv_blocks`."""


class RequestError(FabricError):
    """A bad request (empty prompt, token outside the vocabulary, max_new_tokens < 1, ...).

    It fails alone: the fabric keeps serving the other requests."""


class CapacityError(FabricError):
    """The request cannot fit even in an empty fabric (prompt + max_new_tokens within lending caps)."""
