"""flight-share client: open a catalog, read tables as pandas / Arrow / SQL, save results back."""

from importlib.metadata import PackageNotFoundError, version as _version

from client.catalog import Catalog, Dataset, Relation, Table, connect
from client.load_info import LoadInfo
from client.packages import DataPackage, packages
from client.errors import (
    AuthenticationError,
    DataValidationError,
    FlightShareError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    PipelineStepFailed,
    ServerError,
    ServerUnavailableError,
    UnsupportedError,
    UsageError,
)

try:
    __version__ = _version("flight-share")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__", "connect", "packages", "DataPackage", "Catalog", "Dataset", "Table", "Relation", "LoadInfo",
    "FlightShareError", "NotFoundError", "InvalidRequestError", "UnsupportedError", "PermissionDeniedError",
    "AuthenticationError", "UsageError", "ServerUnavailableError", "ServerError", "DataValidationError", "PipelineStepFailed",
]
