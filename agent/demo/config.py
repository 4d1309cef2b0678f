"""The demo's agent config: the packaged demo.toml, on the demo's broker and simulators, its data
in the demo's temporary directory; EDGE_AGENT__* variables do not apply to it."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from agent.settings.config_file import AgentSettings
from agent.settings.loader import ConfigError, load_agent_settings

DEMO_CONFIG = "demo.toml"
PRIVATE_SYNC_PREFIX = "edge"
_URL = "EDGE_AGENT__MQTT__URL"


def ignored_overrides(environ: dict[str, str] | None = None) -> list[str]:
    """The EDGE_AGENT__* variables set here, which the demo ignores (it says so)."""
    env = os.environ if environ is None else environ
    return sorted(name for name in env if name.upper().startswith("EDGE_AGENT__"))


def load_demo_config(
    *, broker_url: str, sync_enabled: bool, sync_prefix: str, protocol: str = "auto"
) -> AgentSettings:
    """The packaged demo config on ``broker_url``, speaking ``protocol`` (mqtt.protocol); a bad
    --broker URL is a ConfigError that names --broker."""
    resource = importlib.resources.files("agent") / "data" / DEMO_CONFIG
    # Only the demo's own keys: a variable meant for a real agent on this machine (e.g. its
    # production broker's URL) must not redirect the demo.
    environ = {
        _URL: broker_url,
        "EDGE_AGENT__MQTT__SYNC_ENABLED": "true" if sync_enabled else "false",
        "EDGE_AGENT__MQTT__SYNC_PREFIX": sync_prefix,
        "EDGE_AGENT__MQTT__PROTOCOL": protocol,
    }
    with importlib.resources.as_file(resource) as path:
        try:
            return load_agent_settings(path, environ=environ)
        except ConfigError as exc:
            shown = [
                p.replace("mqtt.url: ", "--broker ").replace(f" (from {_URL})", "")
                for p in exc.problems
            ]
            raise ConfigError(shown) from None


def point_at_simulators(
    settings: AgentSettings, *, modbus_port: int, opcua_url: str, data_dir: Path
) -> AgentSettings:
    """``settings`` on the running simulators, with its data in ``data_dir``."""
    devices = []
    for device in settings.devices:
        url = f"tcp://127.0.0.1:{modbus_port}" if device.driver == "modbus" else opcua_url  # type: ignore[attr-defined]
        devices.append(device.model_copy(update={"url": url}))
    return settings.model_copy(
        update={
            "gateway": settings.gateway.model_copy(update={"data_dir": data_dir}),
            "devices": tuple(devices),
            # The demo must not collide with a real agent's endpoint on this machine.
            "http": settings.http.model_copy(update={"listen": "127.0.0.1:0"}),
        }
    )
