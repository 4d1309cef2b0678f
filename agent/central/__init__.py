"""`edge-agent ingest`: the central program's settings and service wiring (its library is
sync.central).
"""
