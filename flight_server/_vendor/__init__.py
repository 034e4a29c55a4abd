"""Generated protocol modules (see each .proto beside its module for origin and licence)."""
