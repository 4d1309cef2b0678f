"""The project's MQTT 5 client (client.py) and its pure packet codec (wire.py)."""
