"""Command workflows as sagas (docs/workflows.md): command validation, the engine, the saga log."""
