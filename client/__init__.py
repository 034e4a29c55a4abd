"""flight-share client: open a catalog, read tables as pandas / Arrow / SQL, save results back."""

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
)

__all__ = [
    "connect", "packages", "DataPackage", "Catalog", "Dataset", "Table", "Relation", "LoadInfo",
    "FlightShareError", "NotFoundError", "InvalidRequestError", "UnsupportedError", "PermissionDeniedError",
    "AuthenticationError", "ServerUnavailableError", "ServerError", "DataValidationError", "PipelineStepFailed",
]
