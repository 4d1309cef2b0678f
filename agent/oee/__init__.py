"""OEE (ISO 22400-2, docs/oee.md): the pure engine and calendar, the live task, the offline
replay.
"""
