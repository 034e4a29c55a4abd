"""One live call as the handlers see it: who calls, and the RPC's own objects (streams, writer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from client.load_info import LoadInfo
from flight_server.transport import audit, status
from flight_server.transport.auth import Identity
from flight_server.transport.logins import peer_key


@dataclass
class Call:
    """The context of one RPC, the caller's identity, and what the RPC brought besides its payload."""

    context: flight.ServerCallContext
    identity: Identity
    descriptor: flight.FlightDescriptor | None = None
    reader: Any = None  # DoPut: the upload
    writer: Any = None  # DoPut: where results go

    @property
    def profile(self) -> str:
        return self.identity.profile

    @property
    def share_key(self) -> str:
        """Whose fair share of the server this call takes: its user, or for callers without credentials
        their address (all anonymous callers are one user name, but not one claimant: one notebook's burst
        must not take every other anonymous caller's turn)."""
        if not self.identity.anonymous:
            return self.identity.user
        return f"{self.identity.user} {peer_key(self.context.peer()) or '?'}"

    def cancelled(self) -> bool:
        return bool(self.context.is_cancelled())

    def loaded(self, info: LoadInfo) -> None:
        """A save's figures on the call's audit line (the table as dlt stored it)."""
        record = audit.record_of(self.context)
        if record is not None:
            record.table = info.table_name
            record.rows, record.bytes = info.rows, info.bytes

    def stream(self, reader: pa.RecordBatchReader) -> flight.RecordBatchStream:
        """A result computed while it streams: counted on the audit line, its errors mapped to statuses."""
        return flight.RecordBatchStream(audit.counted(self.context, reader, status.to_flight_error))
