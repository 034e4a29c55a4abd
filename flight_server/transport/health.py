"""The standard gRPC health service (``grpc.health.v1.Health``) on a side port.

Orchestrators (docker-compose, Kubernetes, load balancers) probe it with any stock gRPC health client,
without credentials and without speaking Flight. It answers SERVING for the whole server (service
``""``) and for ``arrow.flight.protocol.FlightService`` while the Flight server runs, and NOT_SERVING
once it shuts down.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

FLIGHT_SERVICE = "arrow.flight.protocol.FlightService"
SERVICES = ("", FLIGHT_SERVICE)


class HealthServer:
    """A small gRPC server holding only the health service."""

    def __init__(self, host: str, port: int) -> None:
        self.servicer = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port} for the health service")
        self.set_serving(False)
        self._server.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in SERVICES:
            self.servicer.set(service, status)

    def stop(self) -> None:
        self.set_serving(False)
        self._server.stop(grace=1).wait()


def check(target: str, service: str = "", timeout: float = 3.0) -> bool:
    """True if the health service at ``target`` (host:port) reports SERVING for ``service``."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    """``python -m flight_server.transport.health [host:]port``: exit 0 when SERVING (for container health checks)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    target = args[0] if args else "8816"
    if ":" not in target:
        target = f"127.0.0.1:{target}"
    return 0 if check(target) else 1


if __name__ == "__main__":
    raise SystemExit(main())
