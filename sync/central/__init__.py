"""The central side (`edge-agent ingest`'s library): batch parsing, PostgreSQL commits, schema,
partitions.
"""
