"""flight-share server: Arrow Flight over the datasets of a dlt project."""
