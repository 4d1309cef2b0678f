"""The SQLite outbox (docs/delivery.md): commit-first group commit, gapless seqs, acks, caps
and gaps.
"""
