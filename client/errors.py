"""Errors a flight-share client raises. None of them needs dlt installed.

Exception tree::

    FlightShareError
    ├── NotFoundError            dataset / table / column not there (or not visible to the profile)
    ├── InvalidRequestError      malformed command, bad SQL
    │   └── UsageError           a client call with arguments that do not go together
    ├── UnsupportedError         the server does not implement this
    ├── PermissionDeniedError    the profile does not allow this (dataset, profile)
    ├── AuthenticationError      missing or bad credentials
    ├── ServerUnavailableError   server or destination unreachable
    ├── ServerError              anything else the server reported
    ├── DataValidationError      a schema/data contract violation (dlt's fields)
    └── PipelineStepFailed       a save failed at a pipeline step; ``__cause__`` is the inner error

Names mirror dlt's (``dlt.common.schema.exceptions.DataValidationError``,
``dlt.pipeline.exceptions.PipelineStepFailed``) so user code reads the same; the classes are ours.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from client.protocol import ErrorDetail, server_message

DLT_DATA_VALIDATION_ERROR = "<class 'dlt.common.schema.exceptions.DataValidationError'>"


class FlightShareError(Exception):
    """Base of every flight-share client error."""

    def __init__(self, message: str, /, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():  # fields as attributes, never over the error's own (message, fields...)
            if not hasattr(self, key):
                setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class NotFoundError(FlightShareError, LookupError):
    """A dataset, table or column that does not exist (or is not visible to this profile)."""


class InvalidRequestError(FlightShareError, ValueError):
    """The server refused a malformed request."""


class UsageError(InvalidRequestError):
    """A client call whose arguments do not go together (raised before anything is sent)."""


class UnsupportedError(FlightShareError, NotImplementedError):
    """The server does not implement this request."""


class PermissionDeniedError(FlightShareError, PermissionError):
    """The profile does not allow this."""


class AuthenticationError(FlightShareError):
    """Missing, wrong or expired credentials."""


class ServerUnavailableError(FlightShareError, ConnectionError):
    """The server (or a destination behind it) cannot be reached."""


class ServerError(FlightShareError):
    """Any other error the server reported."""


class DataValidationError(FlightShareError):
    """A write rejected by a schema or data contract; fields as in dlt's exception."""

    schema_name: str | None
    table_name: str | None
    column_name: str | None
    schema_entity: str | None
    contract_mode: str | None


class PipelineStepFailed(FlightShareError):
    """A save failed at a pipeline step (``step``, ``load_id``); ``__cause__`` holds the reason."""

    step: str
    load_id: str | None

    @classmethod
    def wrapping(cls, inner: FlightShareError, step: str, load_id: str | None) -> PipelineStepFailed:
        text = (
            f"Pipeline execution failed at stage {step} when processing package {load_id} with exception:\n\n"
            f"{DLT_DATA_VALIDATION_ERROR if isinstance(inner, DataValidationError) else type(inner)}\n{inner.message}"
        )
        err = cls(text, step=step, load_id=load_id)
        err.__cause__ = inner
        return err


_BY_DETAIL: dict[str, type[FlightShareError]] = {
    "ContractViolation": DataValidationError,
    "Forbidden": PermissionDeniedError,
    "Unauthenticated": AuthenticationError,
    "Unavailable": ServerUnavailableError,
}

# one table: what pyarrow raises for a gRPC status -> our class
_BY_FLIGHT: tuple[tuple[type[BaseException], type[FlightShareError]], ...] = (
    (flight.FlightUnauthenticatedError, AuthenticationError),
    (flight.FlightUnauthorizedError, PermissionDeniedError),
    (flight.FlightUnavailableError, ServerUnavailableError),
    (pa.ArrowKeyError, NotFoundError),
    (pa.ArrowNotImplementedError, UnsupportedError),
    (pa.ArrowInvalid, InvalidRequestError),
)


def translate(exc: BaseException, **context: Any) -> BaseException:
    """Our exception for a pyarrow/Flight one; the request's context fills fields the wire lacks."""
    if isinstance(exc, FlightShareError):
        return exc
    detail = ErrorDetail.from_bytes(getattr(exc, "extra_info", None))
    if detail is not None:
        cls = _BY_DETAIL.get(detail.error)
        if cls is None:
            cls = next((c for f, c in _BY_FLIGHT if isinstance(exc, f)), ServerError)
        return cls(detail.message, **{**context, **detail.fields})
    for flight_cls, cls in _BY_FLIGHT:
        if isinstance(exc, flight_cls):
            return cls(server_message(str(exc)), **context)
    if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
        # pyarrow's client GetSchema turns UNAUTHENTICATED / PERMISSION_DENIED into a bare OSError whose
        # text still ends with the Flight status detail
        for mark, cls in ((". Detail: Unauthenticated", AuthenticationError), (". Detail: Unauthorized", PermissionDeniedError)):
            if mark in str(exc):
                return cls(server_message(str(exc)), **context)
    if isinstance(exc, (flight.FlightError, pa.ArrowException)):
        return ServerError(server_message(str(exc)), **context)
    return exc
