"""The config JSON Schema (`edge-agent schema`, `config/agent.schema.json`)."""

from __future__ import annotations

from typing import Any

from agent.settings.config_file import AgentSettings

SCHEMA_ID = "https://github.com/edge-agent/edge-agent/config/agent.schema.json"


def agent_schema() -> dict[str, Any]:
    """JSON Schema of the agent config file, as the loader validates it."""
    schema = AgentSettings.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}
