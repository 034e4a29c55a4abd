"""A bare pyarrow Flight server: streams one in-memory table, the ceiling flight-share is measured against.

    python benchmarks/bare_flight_server.py --ipc TABLE.arrow [--layouts 65536,122880,...] [--port 0]

The table is read from an Arrow IPC file into memory (no memory map), made contiguous once, and
sliced (zero-copy) into one batch layout per entry of ``--layouts``. A ticket is the JSON
``{"rows": N}`` and selects the layout of N-row batches; DoGet answers with a ``RecordBatchStream``
over that layout, so no Python runs per batch. Prints ``bare serving on grpc://HOST:PORT`` when ready.
"""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow as pa
import pyarrow.flight as flight


class BareServer(flight.FlightServerBase):
    def __init__(self, location: str, table: pa.Table, layouts: list[int]) -> None:
        super().__init__(location)
        self.schema = table.schema
        self.num_rows = table.num_rows
        # one contiguous copy; every layout is zero-copy slices of it
        self.layouts = {rows: pa.Table.from_batches(table.to_batches(max_chunksize=rows), table.schema)
                        for rows in layouts}

    def _layout(self, ticket: bytes) -> pa.Table:
        rows = json.loads(ticket)["rows"]
        if rows not in self.layouts:
            raise KeyError(f"no layout of {rows}-row batches; layouts: {sorted(self.layouts)}")
        return self.layouts[rows]

    def list_flights(self, context, criteria):
        for rows in self.layouts:
            ticket = flight.Ticket(json.dumps({"rows": rows}).encode())
            yield flight.FlightInfo(self.schema, flight.FlightDescriptor.for_command(ticket.ticket),
                                    [flight.FlightEndpoint(ticket, [])], self.num_rows, -1)

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self._layout(ticket.ticket))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", required=True, help="Arrow IPC file (uncompressed) holding the table")
    parser.add_argument("--layouts", default="65536,122880,262144,524288,1048576",
                        help="comma-separated batch sizes (rows) to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    with pa.OSFile(args.ipc, "rb") as f:  # a real read into memory, not a memory map
        table = pa.ipc.open_file(f).read_all()
    table = table.combine_chunks()
    layouts = [int(x) for x in args.layouts.split(",") if x.strip()]
    server = BareServer(f"grpc://{args.host}:{args.port}", table, layouts)
    del table
    print(f"bare serving on grpc://{args.host}:{server.port} ({server.num_rows} rows, layouts {layouts})", flush=True)
    server.serve()


if __name__ == "__main__":
    sys.exit(main())
