"""The command line's client-side commands (``catalog``, ``show``, ``head``, ``sql``, ``save``...): they need
only the client and click (``pip install 'flight-share[cli]'``), never dlt. ``flight-share`` itself (with the
server-side commands) is :mod:`flight_server.cli`; :mod:`client.cli.frame` is the frame both share."""
