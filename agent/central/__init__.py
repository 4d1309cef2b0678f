"""`edge-agent ingest`: the central program's settings, service wiring and metrics (its library
is sync.central).
"""
