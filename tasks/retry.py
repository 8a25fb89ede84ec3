"""Which failures a storage-touching task retries: the store's, never the input's."""

from __future__ import annotations

from typing import Any

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


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` or any exception in its cause chain is a storage or network failure
    (OSError other than a missing file, or a storage client error), which a retry may cure."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
            return False
        if isinstance(exc, OSError | TimeoutError | ConnectionError):
            return True
        if type(exc).__name__ in TRANSIENT_NAMES:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_storage_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry storage failures, fail bad input at once."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False


RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [1, 4, 15],
    "retry_condition_fn": retry_storage_errors,
}
