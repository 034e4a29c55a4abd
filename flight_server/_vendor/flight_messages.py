"""Protobuf messages of Apache Arrow's ``Flight.proto`` and ``FlightSql.proto`` (Apache-2.0) that neither
pyarrow nor the vendored ``FlightSql_pb2`` (an older FlightSql.proto) provides.

Built at import from a descriptor written out below (field numbers and types as in the upstream
.proto files), in a pool of their own: no generated code, no protobuf version pin.

- ``DoPutPreparedStatementResult`` (FlightSql.proto): the answer to binding values to a prepared
  statement, with the handle to use from then on; ``CommandGetXdbcTypeInfo``, ``CommandGetPrimaryKeys``;
- the session options of Flight.proto: ``SessionOptionValue``, ``SetSessionOptionsRequest``/``Result``,
  ``GetSessionOptionsRequest``/``Result``, ``CloseSessionRequest``/``Result``, and
  ``CancelFlightInfoRequest``/``Result`` (of its FlightInfo only the endpoints' tickets). Their action
  bodies and results are the serialised messages themselves (not packed in ``Any``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False,
           oneof: int | None = None, proto3_optional: bool = False) -> _F:
    field = _F(name=name, number=number, type=kind,
               label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    if proto3_optional:
        field.proto3_optional = True
    return field


def _map_entry(name: str, value_kind: int, value_type: str = "") -> descriptor_pb2.DescriptorProto:
    entry = descriptor_pb2.DescriptorProto(name=name, field=[
        _field("key", 1, _F.TYPE_STRING), _field("value", 2, value_kind, value_type)])
    entry.options.map_entry = True
    return entry


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    flight = descriptor_pb2.FileDescriptorProto(name="flight_share_Flight_session.proto",
                                                package="arrow.flight.protocol", syntax="proto3")
    p = ".arrow.flight.protocol."
    value = descriptor_pb2.DescriptorProto(name="SessionOptionValue", field=[
        _field("string_value", 1, _F.TYPE_STRING, oneof=0),
        _field("bool_value", 2, _F.TYPE_BOOL, oneof=0),
        _field("int64_value", 3, _F.TYPE_SFIXED64, oneof=0),
        _field("double_value", 4, _F.TYPE_DOUBLE, oneof=0),
        _field("string_list_value", 5, _F.TYPE_MESSAGE, p + "SessionOptionValue.StringListValue", oneof=0),
    ])
    value.oneof_decl.add(name="option_value")
    value.nested_type.add(name="StringListValue").field.append(_field("values", 1, _F.TYPE_STRING, repeated=True))
    set_request = descriptor_pb2.DescriptorProto(name="SetSessionOptionsRequest", field=[
        _field("session_options", 1, _F.TYPE_MESSAGE, p + "SetSessionOptionsRequest.SessionOptionsEntry", repeated=True)])
    set_request.nested_type.append(_map_entry("SessionOptionsEntry", _F.TYPE_MESSAGE, p + "SessionOptionValue"))
    set_result = descriptor_pb2.DescriptorProto(name="SetSessionOptionsResult", field=[
        _field("errors", 1, _F.TYPE_MESSAGE, p + "SetSessionOptionsResult.ErrorsEntry", repeated=True)])
    error_value = descriptor_pb2.EnumDescriptorProto(name="ErrorValue")
    for number, name in enumerate(("UNSPECIFIED", "INVALID_NAME", "INVALID_VALUE", "ERROR")):
        error_value.value.add(name=name, number=number)
    set_result.enum_type.append(error_value)
    set_result.nested_type.add(name="Error").field.append(
        _field("value", 1, _F.TYPE_ENUM, p + "SetSessionOptionsResult.ErrorValue"))
    set_result.nested_type.append(_map_entry("ErrorsEntry", _F.TYPE_MESSAGE, p + "SetSessionOptionsResult.Error"))
    get_request = descriptor_pb2.DescriptorProto(name="GetSessionOptionsRequest")
    get_result = descriptor_pb2.DescriptorProto(name="GetSessionOptionsResult", field=[
        _field("session_options", 1, _F.TYPE_MESSAGE, p + "GetSessionOptionsResult.SessionOptionsEntry", repeated=True)])
    get_result.nested_type.append(_map_entry("SessionOptionsEntry", _F.TYPE_MESSAGE, p + "SessionOptionValue"))
    close_request = descriptor_pb2.DescriptorProto(name="CloseSessionRequest")
    close_result = descriptor_pb2.DescriptorProto(name="CloseSessionResult", field=[
        _field("status", 1, _F.TYPE_ENUM, p + "CloseSessionResult.Status")])
    status = descriptor_pb2.EnumDescriptorProto(name="Status")
    for number, name in enumerate(("UNSPECIFIED", "CLOSED", "CLOSING", "NOT_CLOSEABLE")):
        status.value.add(name=name, number=number)
    close_result.enum_type.append(status)
    flight.message_type.extend([value, set_request, set_result, get_request, get_result, close_request, close_result])
    # CancelFlightInfo: only the parts read here (a FlightInfo's endpoints' tickets); other fields are skipped
    ticket = descriptor_pb2.DescriptorProto(name="Ticket", field=[_field("ticket", 1, _F.TYPE_BYTES)])
    endpoint = descriptor_pb2.DescriptorProto(name="FlightEndpoint", field=[
        _field("ticket", 1, _F.TYPE_MESSAGE, p + "Ticket")])
    info = descriptor_pb2.DescriptorProto(name="FlightInfo", field=[
        _field("endpoint", 3, _F.TYPE_MESSAGE, p + "FlightEndpoint", repeated=True)])
    cancel_request = descriptor_pb2.DescriptorProto(name="CancelFlightInfoRequest", field=[
        _field("info", 1, _F.TYPE_MESSAGE, p + "FlightInfo")])
    cancel_status = descriptor_pb2.EnumDescriptorProto(name="CancelStatus")
    for number, name in enumerate(("CANCEL_STATUS_UNSPECIFIED", "CANCEL_STATUS_CANCELLED", "CANCEL_STATUS_CANCELLING",
                                   "CANCEL_STATUS_NOT_CANCELLABLE")):
        cancel_status.value.add(name=name, number=number)
    cancel_result = descriptor_pb2.DescriptorProto(name="CancelFlightInfoResult", field=[
        _field("status", 1, _F.TYPE_ENUM, p + "CancelStatus")])
    flight.enum_type.append(cancel_status)
    flight.message_type.extend([ticket, endpoint, info, cancel_request, cancel_result])

    sql = descriptor_pb2.FileDescriptorProto(name="flight_share_FlightSql_extra.proto",
                                             package="arrow.flight.protocol.sql", syntax="proto3")
    put_result = descriptor_pb2.DescriptorProto(name="DoPutPreparedStatementResult", field=[
        _field("prepared_statement_handle", 1, _F.TYPE_BYTES, oneof=0, proto3_optional=True)])
    put_result.oneof_decl.add(name="_prepared_statement_handle")
    sql.message_type.append(put_result)
    type_info = descriptor_pb2.DescriptorProto(name="CommandGetXdbcTypeInfo", field=[
        _field("data_type", 1, _F.TYPE_INT32, oneof=0, proto3_optional=True)])
    type_info.oneof_decl.add(name="_data_type")
    primary_keys = descriptor_pb2.DescriptorProto(name="CommandGetPrimaryKeys", field=[
        _field("catalog", 1, _F.TYPE_STRING, oneof=0, proto3_optional=True),
        _field("db_schema", 2, _F.TYPE_STRING, oneof=1, proto3_optional=True),
        _field("table", 3, _F.TYPE_STRING)])
    primary_keys.oneof_decl.add(name="_catalog")
    primary_keys.oneof_decl.add(name="_db_schema")
    sql.message_type.extend([type_info, primary_keys])
    return [flight, sql]


_POOL = descriptor_pool.DescriptorPool()
for _file in _files():
    _POOL.Add(_file)


def _cls(name: str) -> Any:
    """A message class built at run time: its fields and enum values are unknown to a type checker (Any)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(name))


SessionOptionValue = _cls("arrow.flight.protocol.SessionOptionValue")
SetSessionOptionsRequest = _cls("arrow.flight.protocol.SetSessionOptionsRequest")
SetSessionOptionsResult = _cls("arrow.flight.protocol.SetSessionOptionsResult")
GetSessionOptionsRequest = _cls("arrow.flight.protocol.GetSessionOptionsRequest")
GetSessionOptionsResult = _cls("arrow.flight.protocol.GetSessionOptionsResult")
CloseSessionRequest = _cls("arrow.flight.protocol.CloseSessionRequest")
CloseSessionResult = _cls("arrow.flight.protocol.CloseSessionResult")
CancelFlightInfoRequest = _cls("arrow.flight.protocol.CancelFlightInfoRequest")
CancelFlightInfoResult = _cls("arrow.flight.protocol.CancelFlightInfoResult")
CANCEL_STATUS_CANCELLED = 1
CANCEL_STATUS_NOT_CANCELLABLE = 3
DoPutPreparedStatementResult = _cls("arrow.flight.protocol.sql.DoPutPreparedStatementResult")
CommandGetXdbcTypeInfo = _cls("arrow.flight.protocol.sql.CommandGetXdbcTypeInfo")
CommandGetPrimaryKeys = _cls("arrow.flight.protocol.sql.CommandGetPrimaryKeys")
