"""`edge-agent demo`: the bundled Modbus and OPC UA line simulators and an agent on the demo
config, with live OEE in the terminal, refreshed every second.

The demo is private: it starts its own mosquitto on a free loopback port, or without mosquitto
the amqtt broker embedded in its process (`--broker URL` opts into an existing broker), and when
PostgreSQL is installed the central ingest on a private database, so that the screen shows the
rows stored centrally and the acknowledged seq beside live OEE; without PostgreSQL it runs live
only (`mqtt.sync_enabled = false`). Everything it makes lives in one temporary directory,
deleted at exit.

Modules: run (the order of things), broker, embedded (amqtt) and postgres (the private servers,
on servers), central (the ingest and the stored-rows count), config (the demo's agent config),
screen.
"""

from agent.demo.run import DemoOptions, quiet_logging, run_demo

__all__ = ["DemoOptions", "quiet_logging", "run_demo"]
