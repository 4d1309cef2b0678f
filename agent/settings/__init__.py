"""The agent's config: models (validated once, then immutable), the loader with line numbers,
the JSON Schema.
"""
