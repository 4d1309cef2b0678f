"""Modbus TCP/RTU driver (pymodbus): config, register codec, link, driver. See README.md here."""
