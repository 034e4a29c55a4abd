"""How a failed load step becomes the client's status: UNAVAILABLE only where a retry may succeed (issue 21:
a refusal that a retry cannot fix was answered UNAVAILABLE "retry", and clients that retry looped forever)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from dlt.destinations.exceptions import DatabaseTerminalException, DatabaseTransientException
from dlt.pipeline.exceptions import PipelineStepFailed

from flight_server.domain.errors import InvalidRequest, Unavailable
from flight_server.domain.writer import Writer


def _failed_load(cause: BaseException) -> PipelineStepFailed:
    pipeline = SimpleNamespace(pipeline_name="save_t_pipeline", first_run=False, has_pending_data=False)
    return PipelineStepFailed(pipeline, "load", "1.0", cause)  # type: ignore[arg-type]


@pytest.mark.parametrize("cause", [
    DatabaseTerminalException(Exception("Parser Error: Adding columns with constraints not yet supported")),
    DatabaseTerminalException(Exception('column "_dlt_load_id" of relation "t" contains null values')),
    RuntimeError("Invalid Error: this table cannot take that"),
])
def test_a_refusal_a_retry_cannot_fix_is_invalid_argument(cause: BaseException) -> None:
    error = Writer._step_error(_failed_load(cause), "ds", "t")
    assert isinstance(error, InvalidRequest) and not isinstance(error, Unavailable)
    assert "nothing was written and the table is as it was" in error.message and "retry" not in error.message


@pytest.mark.parametrize("cause", [
    DatabaseTransientException(Exception("server closed the connection unexpectedly")),
    ConnectionError("connection refused"),
    RuntimeError("IO Error: Could not set lock on file \"x.duckdb\": Conflicting lock is held"),
])
def test_an_outage_or_a_lock_is_unavailable(cause: BaseException) -> None:
    error = Writer._step_error(_failed_load(cause), "ds", "t")
    assert isinstance(error, Unavailable), error
