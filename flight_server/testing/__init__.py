"""Helpers for the tests and the benchmarks: real servers (``flight-share serve`` in a subprocess, or in
process) and real backing services (PostgreSQL, an S3 server) on free loopback ports."""
