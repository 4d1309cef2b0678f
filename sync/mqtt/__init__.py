"""The project's MQTT 5 client: the API in client.py, its parts in the sibling modules (see the
docstring of client.py), and the pure packet codec in wire.py."""
