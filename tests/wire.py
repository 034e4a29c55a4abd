"""A Flight client without Arrow: stubs generated from tests/proto/Flight.proto with grpcio-tools.

The wire-conformance tests speak to the server through these stubs only, so what they check is the
bytes on the wire (status codes, metadata, IPC-encapsulated schemas, IPC stream framing), not what
pyarrow makes of them. Flight SQL messages come from the server's vendored FlightSql module.
"""

from __future__ import annotations

import importlib
import struct
import sys
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parent / "proto"
CONTINUATION = b"\xff\xff\xff\xff"
# Message.fbs MessageHeader union type ids
HEADER_SCHEMA, HEADER_DICTIONARY_BATCH, HEADER_RECORD_BATCH = 1, 2, 3


def generate(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Generate Flight_pb2 / Flight_pb2_grpc into ``out_dir`` and import them."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", str(PROTO_DIR / "Flight.proto")])
    if code != 0:
        raise RuntimeError(f"protoc failed with {code}")
    sys.path.insert(0, str(out_dir))
    return importlib.import_module("Flight_pb2"), importlib.import_module("Flight_pb2_grpc")


def split_encapsulated(data: bytes) -> tuple[bytes, bytes]:
    """An IPC encapsulated message (continuation, int32 length, flatbuffer, padding) -> (flatbuffer, rest)."""
    if data[:4] != CONTINUATION:
        raise ValueError(f"no IPC continuation marker: {data[:4]!r}")
    (length,) = struct.unpack("<i", data[4:8])
    if (8 + length) % 8:
        raise ValueError(f"metadata of {length} bytes leaves the message unaligned")
    return data[8:8 + length], data[8 + length:]


def message_header(flatbuffer: bytes) -> tuple[int, int]:
    """(header type, bodyLength) of an Arrow IPC ``Message`` flatbuffer (Message.fbs), read by hand."""
    (root,) = struct.unpack_from("<I", flatbuffer, 0)
    (vtable_rel,) = struct.unpack_from("<i", flatbuffer, root)
    vtable = root - vtable_rel
    vtable_len, _ = struct.unpack_from("<HH", flatbuffer, vtable)

    def field_offset(index: int) -> int:
        pos = 4 + 2 * index
        return struct.unpack_from("<H", flatbuffer, vtable + pos)[0] if pos < vtable_len else 0

    # fields: 0 version (short), 1 header_type (ubyte), 2 header (offset), 3 bodyLength (long)
    type_at, body_at = field_offset(1), field_offset(3)
    header_type = flatbuffer[root + type_at] if type_at else 0
    body_length = struct.unpack_from("<q", flatbuffer, root + body_at)[0] if body_at else 0
    return header_type, body_length


def ipc_stream(messages: list[tuple[bytes, bytes]]) -> bytes:
    """An Arrow IPC stream from FlightData (data_header, data_body) pairs, ending with end-of-stream."""
    out = bytearray()
    for header, body in messages:
        padded = header + b"\x00" * (-len(header) % 8)
        out += CONTINUATION + struct.pack("<i", len(padded)) + padded + body
    out += CONTINUATION + b"\x00\x00\x00\x00"
    return bytes(out)


def flight_data(header_and_body: bytes) -> tuple[bytes, bytes]:
    """One IPC message as written by a stream writer -> FlightData (data_header, data_body)."""
    flatbuffer, rest = split_encapsulated(header_and_body)
    _, body_length = message_header(flatbuffer)
    return flatbuffer, rest[:body_length]
