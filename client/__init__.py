"""flight-share client: open a catalog, read tables as pandas / Arrow / SQL, save results back.

The names below load on first use (PEP 562), so the server can import the wire format
(``client.protocol``) and the shared ``LoadInfo`` without the client's Flight transport.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("flight-share")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

_WHERE = {
    "connect": "client.catalog", "Catalog": "client.catalog", "Dataset": "client.catalog",
    "Table": "client.catalog", "Relation": "client.catalog",
    "LoadInfo": "client.load_info",
    "packages": "client.data_packages", "DataPackage": "client.data_packages",
    **{name: "client.errors" for name in (
        "AuthenticationError", "DataValidationError", "FlightShareError", "InvalidRequestError", "NotFoundError",
        "PermissionDeniedError", "PipelineStepFailed", "ServerError", "ServerUnavailableError", "UnsupportedError",
        "UsageError")},
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see (re-exported names)
    from client.catalog import Catalog, Dataset, Relation, Table, connect  # noqa: F401
    from client.data_packages import DataPackage, packages  # noqa: F401
    from client.errors import (  # noqa: F401 DataValidationError, FlightShareError, InvalidRequestError,
        AuthenticationError,
        NotFoundError,
        PermissionDeniedError,
        PipelineStepFailed,
        ServerError,
        ServerUnavailableError,
        UnsupportedError,
        UsageError,
    )
    from client.load_info import LoadInfo  # noqa: F401
