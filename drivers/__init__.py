"""Protocol drivers behind one Driver interface; see `drivers.registry`."""
