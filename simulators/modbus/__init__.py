"""Modbus TCP/RTU line simulator (`edge-agent simulate modbus`)."""
