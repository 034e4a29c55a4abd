"""The domain: the project file, the catalog, contracts, the writer, the SQL sandbox, partitions and the
hot-table cache. It knows no transport (nothing here imports Flight); the storage adapters
(:mod:`flight_server.storage`) sit under it, the Flight transport (:mod:`flight_server.transport`)
and the command line (:mod:`flight_server.cli`) over it.
"""
