"""Which failures a retry may cure: storage and network errors, never bad input. One rule for
the stage tasks' retries (``tasks/stage.py``) and a batch's per-recipe retries
(:mod:`amalgam.batch`)."""

from __future__ import annotations

from amalgam.registry import RegistryError

# Exception type names from the storage clients (s3fs/aiobotocore/botocore, fsspec's HTTP and
# huggingface_hub), matched by name so that no client library is imported to build the list.
TRANSIENT_NAMES = {
    "ClientError",
    "ConnectionClosedError",
    "EndpointConnectionError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientConnectorError",
    "HfHubHTTPError",
    "HTTPError",
}

#: Seconds to wait before each retry of a transient failure.
RETRY_DELAYS = (1, 4, 15)


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` or any exception in its cause chain is a storage or network failure
    (OSError other than a missing file, or a storage client error), which a retry may cure.
    A tracking store's failure is final here: MLflow's client has retried it already."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, RegistryError):
            return False
        if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
            return False
        if isinstance(exc, OSError | TimeoutError | ConnectionError):
            return True
        if type(exc).__name__ in TRANSIENT_NAMES:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
