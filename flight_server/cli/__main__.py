"""``python -m flight_server.cli``: the ``flight-share`` command."""

from flight_server.cli import main

main(prog_name="flight-share")
