"""OPC UA line simulator (`edge-agent simulate opcua`)."""
