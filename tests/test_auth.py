"""Authentication, authorization, tickets, TLS and audit against real server processes (plaintext and TLS)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import yaml

from client import (
    AuthenticationError,
    NotFoundError,
    ServerUnavailableError,
    connect,
    protocol,
)
from client.protocol import ReadCommand, SqlCommand, encode_command
from flight_server._vendor import FlightSql_pb2 as pb
from flight_server.domain.config import ConfigError, load_project
from flight_server.testing.servers import REPO, ServerProcess, cli, wait_until
from flight_server.transport.auth import RENEW_AFTER, Authenticator
from flight_server.transport.flight_sql import pack
from tests import security
from tests.conftest import Secured
from tests.security import (
    BOT_TOKEN,
    EVENTS,
    INTERNAL,
    JWT_SECRET,
    PASSWORDS,
    REPORTS,
    SECRETS,
)

AUTH_FAILED = protocol.AUTH_FAILED


def bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def header(value: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", value.encode())])


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"iss": "flight-share", "aud": "secure_project", "sub": "alice", "prf": "analysts",
            "iat": now, "exp": now + 600}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def _do_put(client: flight.FlightClient, options: flight.FlightCallOptions, dataset: str = EVENTS) -> None:
    table = pa.table({"id": ["x"]})
    writer, _ = client.do_put(flight.FlightDescriptor.for_path(dataset, "push_event"), table.schema, options)
    writer.write_table(table)
    writer.close()


def rpcs(ticket: flight.Ticket) -> dict[str, Callable[[flight.FlightClient, flight.FlightCallOptions], Any]]:
    descriptor = flight.FlightDescriptor.for_path(EVENTS, "push_event")
    return {
        "list_flights": lambda c, o: list(c.list_flights(b"", o)),
        "get_flight_info": lambda c, o: c.get_flight_info(descriptor, o),
        "get_schema": lambda c, o: c.get_schema(descriptor, o),
        "do_get": lambda c, o: c.do_get(ticket, o).read_all(),
        "do_put": lambda c, o: _do_put(c, o),
        "do_action": lambda c, o: list(c.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""), o)),
        "list_actions": lambda c, o: c.list_actions(o),
    }


def _bad_credentials() -> dict[str, tuple[flight.FlightCallOptions, str]]:
    basic = lambda user, pw: "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()  # noqa: E731
    return {
        "none": (flight.FlightCallOptions(), protocol.AUTH_REQUIRED),
        "wrong password": (header(basic("alice", "not-her-password")), AUTH_FAILED),
        "unknown user": (header(basic("mallory", "not-her-password")), AUTH_FAILED),
        "garbage basic": (header("Basic %%%not-base64"), AUTH_FAILED),
        "garbage bearer": (bearer("not-a-token"), AUTH_FAILED),
        "unknown scheme": (header("Digest abc"), AUTH_FAILED),
        "forged jwt": (bearer(jwt.encode(claims(), "another-secret-of-at-least-32-chars!!", "HS256")), AUTH_FAILED),
        "expired jwt": (bearer(jwt.encode(claims(iat=int(time.time()) - 100, exp=int(time.time()) - 10), JWT_SECRET, "HS256")), AUTH_FAILED),
        "alg none jwt": (bearer(jwt.encode(claims(), None, "none")), AUTH_FAILED),
        "jwt for a user not in the file": (bearer(jwt.encode(claims(sub="mallory"), JWT_SECRET, "HS256")), AUTH_FAILED),
        "jwt for another project": (bearer(jwt.encode(claims(aud="other_project"), JWT_SECRET, "HS256")), AUTH_FAILED),
        "wrong static token": (bearer("fst_" + "A" * 43), AUTH_FAILED),
    }


def test_every_rpc_refuses_missing_or_bad_credentials_with_one_message(secured: Secured) -> None:
    """No credentials, a wrong password, an unknown user, forged/expired tokens: UNAUTHENTICATED on every RPC."""
    client = secured.raw()
    ticket = client.get_flight_info(flight.FlightDescriptor.for_path(EVENTS, "push_event"),
                                    bearer(secured.token())).endpoints[0].ticket
    for name, (options, message) in _bad_credentials().items():
        for rpc, call in rpcs(ticket).items():
            # the wire status is UNAUTHENTICATED for every RPC; pyarrow's client GetSchema alone reports
            # it as a bare OSError (client/errors.translate maps that back to AuthenticationError)
            expected = OSError if rpc == "get_schema" else flight.FlightUnauthenticatedError
            with pytest.raises(expected) as err:
                call(client, options)
            assert protocol.server_message(str(err.value)) == message, (name, rpc)
    assert secured.proc.alive


def test_login_gets_the_users_profile_and_print_names_it(secured: Secured) -> None:
    with secured.login("alice") as catalog:
        assert str(catalog).splitlines()[0] == "Datasets in project secure_project for profile analysts:"
        assert catalog.user == "alice" and catalog.datasets == [EVENTS]
        assert catalog[EVENTS].push_event.arrow().num_rows > 0
    with secured.login("admin") as catalog:
        assert catalog.profile == "admin" and catalog.datasets == [EVENTS, INTERNAL, REPORTS]
    with secured.login("rita") as catalog:
        assert catalog.profile == "reporters" and catalog.datasets == [REPORTS]


def test_wrong_password_and_unknown_user_look_the_same_to_the_client(secured: Secured) -> None:
    with pytest.raises(AuthenticationError) as wrong:
        secured.connect(username="alice", password="guess")
    with pytest.raises(AuthenticationError) as unknown:
        secured.connect(username="nobody", password="guess")
    assert str(wrong.value) == str(unknown.value) == AUTH_FAILED


def test_an_unknown_user_waits_as_long_as_a_check_without_the_work(secure_server: Secured,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: a login for a missing user answers as slowly as a wrong password, but without scrypt's
    work or a check slot (review of issue 22, F1: a spray of made-up names kept real users' checks waiting).
    The first one, before any real check was timed, runs a real check against a hash of the users' cost."""
    import flight_server.transport.auth as auth
    import flight_server.transport.logins as logins

    for key, value in security.ENV.items():
        monkeypatch.setenv(key, value)
    project = load_project(secure_server.proc.project)
    authenticator = Authenticator(project, JWT_SECRET.encode())
    costs: list[tuple[int, int, int]] = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, h: costs.append((h.n, h.r, h.p)) or real(pw, h))
    slept: list[float] = []
    monkeypatch.setattr(logins, "_sleep", slept.append)
    for user in ("nobody", "alice", "nobody-else"):
        with pytest.raises(Exception, match="authentication failed"):
            authenticator.login(user, "wrong")
    assert len(costs) == 2 and costs[0] == costs[1]  # "nobody" (uncalibrated) and alice: real work, same cost
    typical = authenticator.guard._check_seconds
    assert typical is not None and len(slept) == 1 and 0.85 * typical <= slept[0] <= 1.15 * typical


def test_basic_handshake_returns_a_bearer_jwt(secured: Secured) -> None:
    """The ADBC/pyarrow convention: Basic on the Handshake, `authorization: Bearer <jwt>` in the response headers."""
    client = secured.raw()
    key, value = client.authenticate_basic_token("alice", PASSWORDS["alice"])
    assert key == b"authorization" and value.startswith(b"Bearer ")
    token = value.decode().split(" ", 1)[1]
    body = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="secure_project")
    assert body["sub"] == "alice" and body["prf"] == "analysts" and body["exp"] - body["iat"] == 3600
    assert {i.descriptor.path[0] for i in client.list_flights(b"", bearer(token))} == {EVENTS.encode()}


class _Headers(flight.ClientMiddlewareFactory):
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def start_call(self, info: flight.CallInfo) -> flight.ClientMiddleware:
        factory = self

        class Middleware(flight.ClientMiddleware):
            def received_headers(self, headers: dict[str, Any]) -> None:
                factory.received.append(headers)

        return Middleware()


def test_basic_without_padding_on_any_call_is_answered_with_a_bearer(secured: Secured) -> None:
    """The ADBC Go driver sends base64 without '=' padding."""
    headers = _Headers()
    client = secured.raw(middleware=[headers])
    raw = base64.b64encode(b"alice:" + PASSWORDS["alice"].encode()).decode()
    assert raw.endswith("=")  # the password is chosen so that padding matters
    result = list(client.do_action(flight.Action("list-datasets", b""), header("Basic " + raw.rstrip("="))))
    assert protocol.CatalogInfo.from_bytes(result[0].body.to_pybytes()).user == "alice"
    sent_back = [v for h in headers.received for v in h.get("authorization", [])]
    assert sent_back and sent_back[0].startswith("Bearer ey")


def test_static_api_token_and_environment_credentials(secure_server: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    with secure_server.connect(token=BOT_TOKEN) as catalog:
        assert catalog.user == "bot" and catalog.profile == "analysts"
    monkeypatch.setenv(protocol.ENV_TOKEN, BOT_TOKEN)
    with connect(secure_server.url) as catalog:
        assert catalog.user == "bot"
    monkeypatch.delenv(protocol.ENV_TOKEN)
    monkeypatch.setenv(protocol.ENV_USERNAME, "bob")
    monkeypatch.setenv(protocol.ENV_PASSWORD, PASSWORDS["bob"])
    with connect(secure_server.url) as catalog:
        assert catalog.user == "bob"
    # explicit arguments win over the environment
    with connect(secure_server.url, username="admin", password=PASSWORDS["admin"]) as catalog:
        assert catalog.user == "admin"
    monkeypatch.setenv(protocol.ENV_PASSWORD, "wrong")
    with pytest.raises(AuthenticationError):
        connect(secure_server.url)


def test_connect_resolves_address_and_token_file_like_the_command_line(secure_server: Secured, tmp_path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() with no arguments: $FLIGHT_SHARE_URL and $FLIGHT_SHARE_TOKEN_FILE, as `flight-share` reads them."""
    for name in (protocol.ENV_TOKEN, protocol.ENV_USERNAME, protocol.ENV_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(f"\n{BOT_TOKEN}\n")
    monkeypatch.setenv(protocol.ENV_URL, secure_server.url)
    monkeypatch.setenv(protocol.ENV_TOKEN_FILE, str(token_file))
    with connect(**secure_server.tls) as catalog:
        assert catalog.user == "bot"
    monkeypatch.delenv(protocol.ENV_TOKEN_FILE)
    with connect(token_file=token_file, **secure_server.tls) as catalog:
        assert catalog.user == "bot"


def test_legacy_flight_handshake_payload(secure_server: Secured) -> None:
    """pyarrow's ClientAuthHandler: BasicAuth in the handshake stream, token back, sent as auth-token-bin."""

    class Basic(flight.ClientAuthHandler):
        def __init__(self, user: str, password: str) -> None:
            super().__init__()
            self.basic = flight.BasicAuth(user, password)
            self.token = b""

        def authenticate(self, outgoing: Any, incoming: Any) -> None:
            outgoing.write(self.basic.serialize())
            self.token = incoming.read()

        def get_token(self) -> bytes:
            return self.token

    client = secure_server.raw()
    client.authenticate(Basic("bob", PASSWORDS["bob"]))
    info = json.loads(next(iter(client.do_action(flight.Action("list-datasets", b"")))).body.to_pybytes())
    assert info["user"] == "bob" and info["profile"] == "analysts"
    with pytest.raises(flight.FlightUnauthenticatedError):
        secure_server.raw().authenticate(Basic("bob", "wrong"))


def test_anonymous_access_only_where_the_project_enables_it(server: ServerProcess, secure_server: Secured) -> None:
    """The demo project sets server.anonymous_profile; the secure project does not."""
    with connect(server.url) as catalog:
        assert catalog.profile == "access" and catalog.user == "(anonymous)"
    with pytest.raises(AuthenticationError) as err:
        connect(server.url, token="not-a-token")  # bad credentials never fall back to anonymous
    assert str(err.value) == AUTH_FAILED
    with pytest.raises(AuthenticationError) as err:
        connect(secure_server.url)
    assert str(err.value) == protocol.AUTH_REQUIRED


def _message(exc: BaseException, name: str) -> str:
    return protocol.server_message(str(exc)).replace(name, "<name>")


def test_hidden_dataset_answers_exactly_like_a_missing_one(secured: Secured) -> None:
    """ListFlights, list-datasets, GetFlightInfo, GetSchema, SQL and DoGet agree; no existence leak."""
    client, options = secured.raw(), bearer(secured.token("alice"))
    assert {i.descriptor.path[0].decode() for i in client.list_flights(b"", options)} == {EVENTS}
    with secured.login("alice") as catalog:
        assert catalog.datasets == [EVENTS]
    for call in (
        lambda name: client.get_flight_info(flight.FlightDescriptor.for_path(name, "push_event"), options),
        lambda name: client.get_schema(flight.FlightDescriptor.for_path(name, "push_event"), options),
        lambda name: client.get_flight_info(flight.FlightDescriptor.for_command(
            encode_command(SqlCommand(name, "SELECT 1 AS x FROM push_event"))), options),
        lambda name: list(client.list_flights(name.encode(), options)),
        lambda name: list(client.do_action(flight.Action("list-datasets", json.dumps({"datasets": [name]}).encode()), options)),
    ):
        with pytest.raises(pa.ArrowKeyError) as hidden:
            call(INTERNAL)
        with pytest.raises(pa.ArrowKeyError) as missing:
            call("no_such_dataset")
        assert _message(hidden.value, INTERNAL) == _message(missing.value, "no_such_dataset")
    # the admin's ticket for the hidden dataset does not help either
    admin_ticket = client.get_flight_info(flight.FlightDescriptor.for_path(INTERNAL, "push_event"),
                                          bearer(secured.token("admin"))).endpoints[0].ticket
    with pytest.raises(flight.FlightUnauthorizedError):
        client.do_get(admin_ticket, options).read_all()
    with secured.login("alice") as catalog:
        with pytest.raises(NotFoundError):
            catalog[EVENTS].sql(f"SELECT * FROM {INTERNAL}.push_event").arrow()


def test_write_needs_a_write_grant(secured: Secured) -> None:
    client = secured.raw()
    with pytest.raises(flight.FlightUnauthorizedError) as err:
        _do_put(client, bearer(secured.token("alice")))  # analysts: write: false
    assert "may read but not write" in str(err.value)
    with pytest.raises(pa.ArrowKeyError):
        _do_put(client, bearer(secured.token("alice")), INTERNAL)  # not visible: NOT_FOUND, as if missing
    try:  # the admin passes the grant check (what happens next is the write path's business)
        _do_put(client, bearer(secured.token("admin")))
    except flight.FlightError as exc:
        assert not isinstance(exc, (flight.FlightUnauthorizedError, flight.FlightUnauthenticatedError)), exc
    except pa.ArrowException:
        pass


def test_tickets_are_signed_bound_to_the_user_and_expire(secured: Secured) -> None:
    client = secured.raw()
    alice = bearer(secured.token("alice"))
    info = client.get_flight_info(flight.FlightDescriptor.for_path(EVENTS, "push_event"), alice)
    endpoint = info.endpoints[0]
    expires = endpoint.expiration_time.as_py().timestamp() if endpoint.expiration_time is not None else 0
    assert 800 < expires - time.time() <= 900  # server.ticket_ttl default
    assert client.do_get(endpoint.ticket, alice).read_all().num_rows == info.total_records
    # another user of the same profile, a static-token user, and nobody: refused
    for options in (bearer(secured.token("bob")), bearer(BOT_TOKEN)):
        with pytest.raises(flight.FlightUnauthorizedError) as err:
            client.do_get(endpoint.ticket, options).read_all()
        assert "issued to another caller" in str(err.value)
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(endpoint.ticket).read_all()
    # tampering with any byte, or an unsigned command as a ticket: INVALID_ARGUMENT
    raw = endpoint.ticket.ticket
    for forged in (raw[:-2] + (b"AA" if raw[-2:] != b"AA" else b"BB"), raw[:20] + b"x" + raw[21:],
                   encode_command(ReadCommand(EVENTS, "push_event"))):
        with pytest.raises(pa.ArrowInvalid, match="not a valid flight-share ticket"):
            client.do_get(flight.Ticket(forged), alice).read_all()


def _statement(query: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(pack(pb.CommandStatementQuery(query=query)))


def test_flight_sql_tickets_are_bound_to_the_user(secure_server: Secured) -> None:
    """Regression (review 22, F2): a Flight SQL statement's ticket is signed for its caller like a plain one; another
    user's DoGet of it is refused as INVALID_ARGUMENT in the user's terms (that ticket can never work for them)."""
    client = secure_server.raw()
    alice = bearer(secure_server.token("alice"))
    info = client.get_flight_info(_statement(f"SELECT id FROM {EVENTS}.push_event LIMIT 5"), alice)
    endpoint = info.endpoints[0]
    for options in (bearer(secure_server.token("bob")), bearer(BOT_TOKEN)):  # the same profile, other users
        with pytest.raises(pa.ArrowInvalid, match="ticket was issued to another caller; run the query yourself"):
            client.do_get(endpoint.ticket, options).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(endpoint.ticket).read_all()
    assert client.do_get(endpoint.ticket, alice).read_all().num_rows == 5
    assert endpoint.expiration_time is not None
    assert 800 < endpoint.expiration_time.as_py().timestamp() - time.time() <= 900  # server.ticket_ttl default


TTL_SESSION = 5
TTL_SQL_ENDPOINT_ROWS = 40  # a few endpoints over push_event


@pytest.fixture(scope="module")
def ttl_server(tmp_path_factory: pytest.TempPathFactory, secure_data: Path) -> Any:
    """Bearer tokens and tickets that expire after 2 seconds, sessions after 5; the audit log goes to a file; Flight
    SQL results of more than a few rows split into partitions."""
    project = security.secure_project(tmp_path_factory.mktemp("ttl"), secure_data,
                                      f"  token_ttl: 2\n  ticket_ttl: 2\n  session_ttl: {TTL_SESSION}\n"
                                      f"  audit_log: logs/audit.jsonl\n  sql_endpoint_rows: {TTL_SQL_ENDPOINT_ROWS}\n")
    with ServerProcess(project, env=security.ENV) as proc:
        yield Secured(proc, "plain")


def test_expired_ticket_is_refused_and_an_expired_token_renewed_within_its_session(ttl_server: Secured) -> None:
    headers = _Headers()
    client = ttl_server.raw(middleware=[headers])
    token = ttl_server.token("alice")
    ticket = client.get_flight_info(flight.FlightDescriptor.for_path(EVENTS, "push_event"), bearer(token)).endpoints[0].ticket
    catalog = ttl_server.login("alice")
    table = catalog[EVENTS].push_event
    # past the token's expiry (2 s) but as early as possible within its session (5 s from the login)
    expires = jwt.decode(token, options={"verify_signature": False})["exp"]
    wait_until(lambda: time.time() > expires + 0.1, "the token's expiry", timeout=10)
    headers.received.clear()  # the token has expired, its session (5 s) has not: the call gets a fresh one
    assert {i.descriptor.path[0] for i in client.list_flights(b"", bearer(token))} == {EVENTS.encode()}
    assert _sent_bearers(headers)
    with pytest.raises(flight.FlightUnauthenticatedError) as err:
        list(client.list_flights(b"", bearer("not-a-token")))
    assert protocol.server_message(str(err.value)) == AUTH_FAILED
    with pytest.raises(flight.FlightUnauthorizedError, match="ticket has expired"):
        client.do_get(ticket, bearer(ttl_server.token("alice"))).read_all()
    assert table.arrow().num_rows > 0  # the client renews its token with the password it was given
    # server.audit_log: one JSON object per line in the file, none in the process log
    audit = ttl_server.proc.project.parent / "logs" / "audit.jsonl"

    def audited() -> list[dict[str, Any]]:
        return [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []

    wait_until(lambda: any(x["rpc"] == "do_get" and x["outcome"] == "PERMISSION_DENIED" and x["user"] == "alice"
                           for x in audited()) and any(x["outcome"] == "UNAUTHENTICATED" for x in audited()),
               "the refused calls in the audit file")
    lines = audited()
    assert any(x["rpc"] == "do_get" and x["outcome"] == "PERMISSION_DENIED" and x["user"] == "alice" for x in lines)
    assert any(x["outcome"] == "UNAUTHENTICATED" for x in lines)
    assert "flight_share.audit" not in ttl_server.proc.output()


def test_flight_sql_tickets_and_partitions_expire(ttl_server: Secured) -> None:
    """Regression (review 22, F2): the tickets of a Flight SQL result - of one endpoint, and of every partition of a
    split one - expire after server.ticket_ttl like plain tickets (their endpoints say when): an old partition,
    of a table its owner may have replaced since, cannot be read after that (INVALID_ARGUMENT: run it again)."""
    client = ttl_server.raw()
    alice = lambda: bearer(ttl_server.token("alice"))  # noqa: E731 - a fresh login per call: sessions last 5 s here
    split = client.get_flight_info(_statement(f"SELECT id FROM {EVENTS}.push_event"), alice())
    one = client.get_flight_info(_statement(f"SELECT count(*) AS n FROM {EVENTS}.push_event"), alice())
    assert len(split.endpoints) > 1 and len(one.endpoints) == 1
    answered = time.time()  # every ticket expires by then + server.ticket_ttl (2 s)
    endpoints = [*split.endpoints, *one.endpoints]
    wait_until(lambda: time.time() > answered + 2 + 0.1, "the tickets' expiry", timeout=10)
    for endpoint in endpoints:
        with pytest.raises(pa.ArrowInvalid, match=r"ticket has expired \(they are valid for 2 s, server.ticket_ttl\); "
                                                  "run the query again"):
            client.do_get(endpoint.ticket, alice()).read_all()
    assert all(e.expiration_time is not None and e.expiration_time.as_py().timestamp() < time.time() for e in endpoints)


def test_a_token_past_half_its_life_is_renewed_and_an_expired_one_is_not(secure_server: Secured,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: RENEW_AFTER of the lifetime gone -> a fresh token; expired -> renewed within the session,
    UNAUTHENTICATED past it; API tokens never."""
    for key, value in security.ENV.items():
        monkeypatch.setenv(key, value)
    authenticator = Authenticator(load_project(secure_server.proc.project), JWT_SECRET.encode())
    start = time.time() - 3600 * 0.51  # token_ttl is the default hour
    token = authenticator.issue(authenticator.login("alice", PASSWORDS["alice"]), now=start)
    assert authenticator.verify_renewing(token, now=start + 3600 * 0.49)[1] is None
    identity, fresh = authenticator.verify_renewing(token)
    assert identity.user == "alice" and fresh is not None
    body = jwt.decode(fresh, JWT_SECRET, algorithms=["HS256"], audience="secure_project")
    assert body["iat"] >= int(start + 3600 * 0.51) and body["exp"] - body["iat"] == 3600
    assert authenticator.verify_renewing(BOT_TOKEN, now=start + 10 ** 6) == (authenticator.verify(BOT_TOKEN), None)
    idle = authenticator.issue(authenticator.login("alice", PASSWORDS["alice"]), now=start - 3601)
    assert authenticator.verify_renewing(idle)[1] is not None  # expired, within its session: renewed
    ended = authenticator.issue(authenticator.login("alice", PASSWORDS["alice"]), now=start - 12 * 3600)
    with pytest.raises(Exception, match="authentication failed"):
        authenticator.verify_renewing(ended)


def _sent_bearers(headers: _Headers) -> list[str]:
    return [v.split(" ", 1)[1] for h in headers.received for v in h.get("authorization", []) if v.startswith("Bearer ")]


def _wait_until_due_for_renewal(token: str) -> None:
    """Until the token has lived RENEW_AFTER of its lifetime (its own iat and exp say when): the subject of the
    test is a token's age, so this waits for the clock, not for the server."""
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="secure_project")
    due = claims["iat"] + (claims["exp"] - claims["iat"]) * RENEW_AFTER
    wait_until(lambda: time.time() >= due, "the token's renewal time", timeout=10)


def test_calls_renew_the_token_over_the_wire_and_a_chain_outlives_the_ttl(ttl_server: Secured) -> None:
    """token_ttl 2 s: a client that adopts the Bearer of each answer keeps working past the ttl - until the
    session (5 s) ends, when its latest token and the first are refused alike."""
    headers = _Headers()
    client = ttl_server.raw(middleware=[headers])
    # a first listing on a fresh server opens its catalog (seconds on a busy machine): not within the session below
    list(client.list_flights(b"", bearer(ttl_server.token("alice"))))
    first = token = ttl_server.token("alice")
    session_end = jwt.decode(first, JWT_SECRET, algorithms=["HS256"], audience="secure_project")["sst"] + TTL_SESSION
    for _ in range(2):  # two renewals (each token lives 2 s); the session's end (5 s) bounds them
        _wait_until_due_for_renewal(token)
        headers.received.clear()
        assert {i.descriptor.path[0] for i in client.list_flights(b"", bearer(token))} == {EVENTS.encode()}
        sent = _sent_bearers(headers)
        assert sent, "a call with a token past its renewal time got no fresh one"
        assert jwt.decode(sent[-1], JWT_SECRET, algorithms=["HS256"], audience="secure_project")["sub"] == "alice"
        token = sent[-1]
    assert token != first
    assert jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="secure_project")["exp"] <= session_end
    wait_until(lambda: time.time() > session_end + 0.5, "the end of the session", timeout=10)
    for old in (first, token):
        with pytest.raises(flight.FlightUnauthenticatedError) as err:
            list(client.list_flights(b"", bearer(old)))
        assert protocol.server_message(str(err.value)) == AUTH_FAILED


NO_CREDENTIALS = {
    "Bearer None (flightsql-dbapi without a token)": "Bearer None",
    "Bearer null": "Bearer null",
    "Bearer with nothing": "Bearer ",
    "Basic, empty user and password": "Basic " + base64.b64encode(b":").decode(),
    "Basic, empty user and password, unpadded": "Basic " + base64.b64encode(b":").decode().rstrip("="),
}


def test_clients_that_always_send_credentials_can_say_none(server: ServerProcess, secure_server: Secured) -> None:
    """Where anonymous access is on, "no credentials" spelled as clients spell it is anonymous; elsewhere it
    gets the no-credentials message. A real but wrong credential never becomes anonymous."""
    open_client, closed_client = flight.connect(server.url), secure_server.raw()
    for name, value in NO_CREDENTIALS.items():
        (result,) = open_client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""), header(value))
        info = protocol.CatalogInfo.from_bytes(result.body.to_pybytes())
        assert (info.user, info.profile) == ("(anonymous)", "access"), name
        with pytest.raises(flight.FlightUnauthenticatedError) as err:
            list(closed_client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""), header(value)))
        assert protocol.server_message(str(err.value)) == protocol.AUTH_REQUIRED, name
    for value in ("Bearer Nonesuch", "Basic " + base64.b64encode(b":some-password").decode(),
                  "Basic " + base64.b64encode(b"alice:").decode()):
        with pytest.raises(flight.FlightUnauthenticatedError) as err:
            list(open_client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""), header(value)))
        assert protocol.server_message(str(err.value)) == AUTH_FAILED, value
    # pyarrow's Basic handshake with empty credentials: anonymous where allowed
    key, value = open_client.authenticate_basic_token("", "")
    assert not value or value == b"Bearer "
    with pytest.raises(flight.FlightUnauthenticatedError):
        closed_client.authenticate_basic_token("", "")


def test_api_token_logs_in_as_the_password_of_its_user(secure_server: Secured) -> None:
    """Tools with only user and password fields: user bot, password = bot's API token -> a bearer JWT."""
    import adbc_driver_flightsql.dbapi as adbc

    client = secure_server.raw()
    key, value = client.authenticate_basic_token("bot", BOT_TOKEN)
    token = value.decode().split(" ", 1)[1]
    assert jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="secure_project")["sub"] == "bot"
    for user in ("alice", "nobody", ""):  # a token logs in only its own user
        with pytest.raises(flight.FlightUnauthenticatedError) as err:
            secure_server.raw().authenticate_basic_token(user, BOT_TOKEN)
        assert protocol.server_message(str(err.value)) == AUTH_FAILED
    with adbc.connect(secure_server.url, db_kwargs={"username": "bot", "password": BOT_TOKEN}) as conn, \
            conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {EVENTS}.push_event")
        assert cur.fetchone()[0] > 0
    with secure_server.connect(username="bot", password=BOT_TOKEN) as catalog:
        assert (catalog.user, catalog.profile) == ("bot", "analysts")
    assert BOT_TOKEN not in secure_server.proc.settled_output()


def test_tls_needs_the_servers_ca(tls_server: Secured, pki: security.Pki) -> None:
    with pytest.raises(ServerUnavailableError):
        connect(tls_server.url, username="alice", password=PASSWORDS["alice"])  # system CAs do not know ours
    with pytest.raises(ServerUnavailableError):
        connect(tls_server.url.replace("grpc+tls://", "grpc://"), username="alice", password=PASSWORDS["alice"])
    # PEM paths, PEM text and PEM bytes are all accepted
    for root in (pki.ca, str(pki.ca), pki.ca.read_text(), pki.ca.read_bytes()):
        with connect(tls_server.url, username="alice", password=PASSWORDS["alice"], tls_root_certs=root) as catalog:
            assert catalog.profile == "analysts"


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: Secured, pki: security.Pki) -> None:
    with mtls_server.login("alice") as catalog:
        assert catalog[EVENTS].push_event.row_count() > 0
    base = {"username": "alice", "password": PASSWORDS["alice"], "tls_root_certs": pki.ca}
    with pytest.raises(ServerUnavailableError):
        connect(mtls_server.url, **base)  # no client certificate
    with pytest.raises(ServerUnavailableError):
        connect(mtls_server.url, **base, cert_chain=pki.rogue_cert, private_key=pki.rogue_key)
    with pytest.raises(AuthenticationError):  # a certificate is not a login
        mtls_server.connect()
    assert mtls_server.proc.alive


def _minimal_project(folder: Path, server: str, users: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = security.project_yaml().split("server:")[0] if users else ""
    if not users:
        text = "project: {name: p}\ndestinations: {lake: {type: duckdb, location: _data/l.duckdb}}\n" \
               "datasets: {d: {destination: lake}}\nprofiles: {access: {datasets: {d: {}}}}\n"
    path = folder / "dlt.yml"
    path.write_text(text + server)
    return path


def test_serve_warns_loudly_about_plaintext_passwords_off_loopback(tmp_path: Path, pki: security.Pki) -> None:
    project = _minimal_project(tmp_path / "a", "server: {}\n")
    env = {k: v for k, v in security.ENV.items() if k != "FLIGHT_SHARE_JWT_SECRET"}
    with ServerProcess(project, "--host", "0.0.0.0", env={**env, "FLIGHT_SHARE_JWT_SECRET": ""}) as proc:
        log = proc.settled_output()  # the warnings are written before the ready line
    assert "PLAINTEXT on 0.0.0.0: passwords and bearer tokens will cross the network unencrypted" in log
    assert "will not survive a restart" in log  # no signing secret configured: a random one
    with ServerProcess(project, "--host", "0.0.0.0", "--tls-cert", str(pki.server_cert), "--tls-key",
                       str(pki.server_key), env=security.ENV) as proc:
        assert proc.scheme == "grpc+tls" and "PLAINTEXT" not in proc.settled_output()


def test_serve_refuses_unusable_security_settings(tmp_path: Path, pki: security.Pki) -> None:
    nobody = _minimal_project(tmp_path / "n", "", users=False)
    result = cli("serve", "--project", str(nobody), "--port", "0", check=False, timeout=60)
    assert result.returncode != 0 and "nobody could connect" in result.stderr
    short = _minimal_project(tmp_path / "s", "server: {}\n")
    result = cli("serve", "--project", str(short), "--port", "0", check=False, timeout=60,
                 env={**security.ENV, "FLIGHT_SHARE_JWT_SECRET": "too-short"})
    assert result.returncode != 0 and "at least 32 characters" in result.stderr and "Traceback" not in result.stderr
    result = cli("serve", "--project", str(short), "--port", "0", "--tls-cert", str(pki.server_cert),
                 check=False, timeout=60, env=security.ENV)
    assert result.returncode != 0 and "needs both --tls-cert and --tls-key" in result.stderr


USERS_BASE = """
project: {name: p}
destinations: {lake: {type: duckdb, location: data/lake.duckdb}}
datasets: {ds: {destination: [lake]}}
profiles: {access: {datasets: {ds: {}}}}
"""


@pytest.mark.parametrize(
    "tail, key, words",
    [
        ("users: {alice: {profile: access, password: hunter2}}", "users.alice.password", "plaintext secrets are not allowed"),
        ("users: {alice: {profile: access, password_hash: 'md5$abc'}}", "users.alice.password_hash", "must be an scrypt hash"),
        ("users: {alice: {profile: nope, token_hash: 'sha256$" + "0" * 64 + "'}}", "users.alice.profile", "profile 'nope' is not defined"),
        ("users: {alice: {profile: access, token_hash: [sha256$zz]}}", "users.alice.token_hash[0]", "must be a token hash"),
        ("users: {alice: {profile: access}}", "users.alice", "needs a 'password_hash' or a 'token_hash'"),
        ("users: {'bad:name': {profile: access}}", "users.bad:name", "not a valid user name"),
        ("server: {jwt_secret: literally-a-secret-in-the-file-0123456789}", "server.jwt_secret", "must be '{env.NAME}'"),
        ("server: {anonymous_profile: nope}", "server.anonymous_profile", "profile 'nope' is not defined"),
        ("server: {profile: access, anonymous_profile: access}", "server.profile", "former name"),
        ("server: {sql_max_rows: -1}", "server.sql_max_rows", "positive number"),
        ("server: {sql_memory_limit: lots}", "server.sql_memory_limit", "size like"),
    ],
)
def test_security_config_errors_name_file_and_key(tmp_path: Path, tail: str, key: str, words: str) -> None:
    path = tmp_path / "dlt.yml"
    path.write_text(USERS_BASE + tail + "\n")
    with pytest.raises(ConfigError) as err:
        load_project(path)
    assert err.value.key == key and words in str(err.value) and str(path) in str(err.value)


def test_users_add_prints_an_entry_that_logs_in(tmp_path: Path) -> None:
    (tmp_path / "dlt.yml").write_text(USERS_BASE)
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "flight_server.cli", "users", "add", *args, "--project", str(tmp_path / "dlt.yml")],
        cwd=REPO, capture_output=True, text=True, timeout=60, **kw)
    password = run("carol", "--profile", "access", "--password-stdin", input="carols-password\n")
    token = run("robot", "--profile", "access", "--token")
    assert password.returncode == token.returncode == 0, password.stderr + token.stderr
    assert "carols-password" not in password.stdout + password.stderr
    api_token = token.stderr.strip().rsplit(" ", 1)[1]
    assert api_token.startswith("fst_") and api_token not in token.stdout
    users = {**yaml.safe_load(password.stdout)["users"], **yaml.safe_load(token.stdout)["users"]}
    (tmp_path / "dlt.yml").write_text(USERS_BASE + yaml.safe_dump({"users": users}))
    project = load_project(tmp_path / "dlt.yml")
    authenticator = Authenticator(project, JWT_SECRET.encode())
    assert authenticator.login("carol", "carols-password").profile == "access"
    assert authenticator.verify(api_token).user == "robot"
    assert authenticator.verify(authenticator.issue(authenticator.login("carol", "carols-password"))).user == "carol"
    bad = run("dave", "--profile", "nope", "--password-stdin", input="x\n")
    assert bad.returncode != 0 and "profile 'nope' is not defined" in bad.stderr


def _audit_lines(proc: ServerProcess) -> list[dict[str, Any]]:
    """The audit lines of the process log, once everything the server has logged so far has been read."""
    lines = []
    for line in proc.settled_output().splitlines():
        if "flight_share.audit " in line:
            lines.append(json.loads(line.split("flight_share.audit ", 1)[1]))
    return lines


def test_one_audit_line_per_call_with_user_profile_rows_and_outcome(secure_server: Secured) -> None:
    client = secure_server.raw()
    options = bearer(secure_server.token("rita"))
    with secure_server.login("admin") as admin:
        rows = admin[EVENTS].watch_event.row_count()
    info = client.get_flight_info(flight.FlightDescriptor.for_path(EVENTS, "watch_event"), bearer(secure_server.token("bob")))
    table = client.do_get(info.endpoints[0].ticket, bearer(secure_server.token("bob"))).read_all()
    sql = flight.FlightDescriptor.for_command(protocol.encode_command(
        protocol.SqlCommand(EVENTS, "SELECT id FROM watch_event")))
    sql_info = client.get_flight_info(sql, bearer(secure_server.token("bob")))
    client.do_get(sql_info.endpoints[0].ticket, bearer(secure_server.token("bob"))).read_all()
    with pytest.raises(pa.ArrowKeyError):
        client.get_schema(flight.FlightDescriptor.for_path(EVENTS, "watch_event"), options)
    with pytest.raises(OSError, match="authentication failed"):
        client.get_schema(flight.FlightDescriptor.for_path(EVENTS, "watch_event"), header("Basic " + base64.b64encode(b"bob:x").decode()))
    # a call is audited when it ends, which may be after its client saw the answer
    wanted = (lambda x: x["user"] == "bob" and x["rpc"] == "do_get" and x["table"] == "watch_event",
              lambda x: x["user"] == "bob" and x["rpc"] == "do_get" and x["table"] is None,
              lambda x: x["user"] == "rita" and x["rpc"] == "get_schema",
              lambda x: x["rpc"] == "get_schema" and x["outcome"] == "UNAUTHENTICATED")
    lines = wait_until(lambda: (found := _audit_lines(secure_server.proc)) and all(
        any(w(x) for x in found) for w in wanted) and found, "every call of this test in the audit log")
    assert all(set(line) >= {"time", "user", "profile", "rpc", "dataset", "table", "rows", "bytes", "outcome"} for line in lines)
    get = [x for x in lines if x["user"] == "bob" and x["rpc"] == "do_get" and x["table"] == "watch_event"][-1]
    assert get["profile"] == "analysts" and get["dataset"] == EVENTS and get["outcome"] == "ok"
    # a table stream is handed to Flight as a C++ reader (no Python per batch): no streamed count;
    # GetFlightInfo's total_records is the figure. SQL results pass the sandbox's limits and are counted.
    assert get["rows"] is None and info.total_records == table.num_rows == rows
    sql_get = [x for x in lines if x["user"] == "bob" and x["rpc"] == "do_get" and x["table"] is None][-1]
    assert sql_get["outcome"] == "ok" and sql_get["rows"] == rows and sql_get["bytes"] > 0
    denied = [x for x in lines if x["user"] == "rita" and x["rpc"] == "get_schema"][-1]
    assert denied["outcome"] == "NOT_FOUND" and denied["profile"] == "reporters"
    refused = [x for x in lines if x["rpc"] == "get_schema" and x["outcome"] == "UNAUTHENTICATED"]
    assert refused and refused[-1]["user"] is None


def test_secrets_never_leave_the_server(secured: Secured) -> None:
    """Errors echo names the caller sent: a secret among them comes back as ***; logs hold no secret."""
    client = secured.raw()
    with pytest.raises(pa.ArrowKeyError) as err:
        client.get_flight_info(flight.FlightDescriptor.for_path(security.PG_SECRET, "t"), bearer(secured.token()))
    assert security.PG_SECRET not in str(err.value) and "***" in str(err.value)
    with pytest.raises(AuthenticationError) as err:
        secured.connect(token=JWT_SECRET)
    assert JWT_SECRET not in str(err.value)
    log = secured.proc.settled_output()
    for secret in SECRETS:
        assert secret not in log
    assert "eyJ" not in log  # no bearer token (JWT) in any log line


def test_adbc_flight_sql_driver_logs_in_with_basic_and_uses_the_bearer(secure_server: Secured) -> None:
    """The ADBC Go driver: Handshake with Basic (no padding), Bearer from the response headers."""
    import adbc_driver_flightsql.dbapi as adbc

    with pytest.raises(Exception, match="(?i)unauthenticated|authentication failed"):
        adbc.connect(secure_server.url, db_kwargs={"username": "alice", "password": "wrong"}).close()
    conn = adbc.connect(secure_server.url, db_kwargs={"username": "alice", "password": PASSWORDS["alice"]})
    conn.close()
    lines = wait_until(lambda: (found := _audit_lines(secure_server.proc)) and any(
        x["rpc"] == "handshake" and x["user"] == "alice" and x["outcome"] == "ok" for x in found) and found,
        "alice's handshake in the audit log")
    assert any(x["rpc"] == "handshake" and x["user"] == "alice" and x["outcome"] == "ok" for x in lines)
