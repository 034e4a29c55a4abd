"""The Flight transport: decoding, the one dispatch table, auth, tickets, audit, health, TLS, statuses.

Nothing below this package (the domain, the storage adapters) imports Flight.
"""
