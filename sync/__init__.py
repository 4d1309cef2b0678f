"""Durable path: the SQLite outbox, the forwarder, the MQTT client, the central ingest."""
