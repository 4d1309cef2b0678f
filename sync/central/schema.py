"""The central PostgreSQL schema (docs/central.md) and its idempotent, versioned migrations.

Every statement is written to be re-runnable (``IF NOT EXISTS`` / ``OR REPLACE``) and the whole
migration runs in one transaction under a transaction-level advisory lock, so any number of
ingest replicas may start at the same moment: one applies, the others wait and find nothing
left to do. ``edge_schema_version`` records what was applied.
"""

from __future__ import annotations

from typing import Any

# Fixed advisory-lock keys ("edge" in ASCII, then a number): shared by every replica.
MIGRATION_LOCK_KEY = 0x6564676500000001
MAINTENANCE_LOCK_KEY = 0x6564676500000002

_V1 = r"""
CREATE TABLE IF NOT EXISTS edge_events (
  gateway_id text NOT NULL,
  stream_id uuid NOT NULL,
  seq bigint NOT NULL,
  ts timestamptz NOT NULL,
  kind text NOT NULL,
  device text,
  tag text,
  value jsonb,
  quality text,
  received_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (gateway_id, stream_id, seq, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE IF NOT EXISTS edge_events_default PARTITION OF edge_events DEFAULT;

-- Gap events are rare and listed often (edge_gaps): a small partial index finds them.
CREATE INDEX IF NOT EXISTS edge_events_gaps_idx
  ON edge_events (gateway_id, stream_id, seq) WHERE kind = 'gap';

CREATE TABLE IF NOT EXISTS edge_streams (
  gateway_id text NOT NULL,
  stream_id uuid NOT NULL,
  acked_seq bigint NOT NULL,
  last_seen timestamptz,
  PRIMARY KEY (gateway_id, stream_id)
);

-- Committed batch ranges still above their stream's watermark (out-of-order arrivals).
-- Ranges at or below the watermark are deleted as soon as it passes them.
CREATE TABLE IF NOT EXISTS edge_stream_ranges (
  gateway_id text NOT NULL,
  stream_id uuid NOT NULL,
  first_seq bigint NOT NULL,
  last_seq bigint NOT NULL,
  committed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (gateway_id, stream_id, first_seq, last_seq),
  CHECK (first_seq >= 1 AND first_seq <= last_seq)
);

-- Record that [p_first, p_last] of a stream is committed (in the caller's transaction) and
-- return the stream's new watermark: the highest s such that [1..s] is covered by the union
-- of committed ranges. The stream row is locked first, so concurrent commits of one stream
-- (several workers, several replicas) are serialised here and each sees the others' ranges.
CREATE OR REPLACE FUNCTION edge_commit_range(
  p_gateway text, p_stream uuid, p_first bigint, p_last bigint
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  w bigint;
  r record;
BEGIN
  INSERT INTO edge_streams (gateway_id, stream_id, acked_seq, last_seen)
  VALUES (p_gateway, p_stream, 0, now())
  ON CONFLICT (gateway_id, stream_id) DO NOTHING;

  SELECT acked_seq INTO w FROM edge_streams
  WHERE gateway_id = p_gateway AND stream_id = p_stream
  FOR UPDATE;

  IF p_last > w THEN
    INSERT INTO edge_stream_ranges (gateway_id, stream_id, first_seq, last_seq)
    VALUES (p_gateway, p_stream, p_first, p_last)
    ON CONFLICT DO NOTHING;
    -- Walk the pending ranges in order: each one touching [1..w] extends w.
    FOR r IN
      SELECT first_seq, last_seq FROM edge_stream_ranges
      WHERE gateway_id = p_gateway AND stream_id = p_stream
      ORDER BY first_seq
    LOOP
      EXIT WHEN r.first_seq > w + 1;
      w := greatest(w, r.last_seq);
    END LOOP;
    DELETE FROM edge_stream_ranges
    WHERE gateway_id = p_gateway AND stream_id = p_stream AND last_seq <= w;
  END IF;

  UPDATE edge_streams SET acked_seq = w, last_seen = now()
  WHERE gateway_id = p_gateway AND stream_id = p_stream;
  RETURN w;
END
$fn$;

-- One row per dropped seq range declared by a gap event (value {"reason","ranges","count"}).
-- Defensive casts: a gap event with an unexpected value still appears (NULL bounds) instead
-- of making the whole view fail.
CREATE OR REPLACE VIEW edge_gaps AS
SELECT
  e.gateway_id,
  e.stream_id,
  e.seq AS gap_seq,
  e.ts,
  e.value ->> 'reason' AS reason,
  CASE WHEN (r.item -> 0)::text ~ '^[0-9]{1,18}$' THEN (r.item -> 0)::text::bigint END
    AS first_seq,
  CASE WHEN (r.item -> 1)::text ~ '^[0-9]{1,18}$' THEN (r.item -> 1)::text::bigint END
    AS last_seq,
  CASE WHEN (r.item -> 0)::text ~ '^[0-9]{1,18}$' AND (r.item -> 1)::text ~ '^[0-9]{1,18}$'
    THEN (r.item -> 1)::text::bigint - (r.item -> 0)::text::bigint + 1 END
    AS seq_count,
  CASE WHEN (e.value -> 'count')::text ~ '^[0-9]{1,18}$' THEN (e.value -> 'count')::text::bigint END
    AS total_count,
  e.value,
  e.received_at
FROM edge_events e
LEFT JOIN LATERAL jsonb_array_elements(
  CASE WHEN jsonb_typeof(e.value -> 'ranges') = 'array' THEN e.value -> 'ranges'
  ELSE '[]'::jsonb END
) AS r(item) ON true
WHERE e.kind = 'gap';
"""

# Version 2: a batch records several ranges at once: its own and each range its gap events
# declare dropped (docs/central.md, "What the ingest acknowledges"). One call, one walk.
# edge_commit_range (version 1) stays for replicas of the previous release during an upgrade.
_V2 = r"""
-- Record that the ranges [p_firsts[i], p_lasts[i]] of a stream are committed or declared
-- dropped (in the caller's transaction) and return the stream's new watermark: the highest s
-- such that [1..s] is covered by the union of recorded ranges. The stream row is locked first,
-- so concurrent commits of one stream (several workers, several replicas) are serialised here
-- and each sees the others' ranges.
CREATE OR REPLACE FUNCTION edge_commit_ranges(
  p_gateway text, p_stream uuid, p_firsts bigint[], p_lasts bigint[]
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  w bigint;
  r record;
BEGIN
  IF cardinality(p_firsts) IS DISTINCT FROM cardinality(p_lasts) THEN
    RAISE EXCEPTION 'edge_commit_ranges: % firsts for % lasts',
      cardinality(p_firsts), cardinality(p_lasts)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  INSERT INTO edge_streams (gateway_id, stream_id, acked_seq, last_seen)
  VALUES (p_gateway, p_stream, 0, now())
  ON CONFLICT (gateway_id, stream_id) DO NOTHING;

  SELECT acked_seq INTO w FROM edge_streams
  WHERE gateway_id = p_gateway AND stream_id = p_stream
  FOR UPDATE;

  -- Ranges at or below the watermark add nothing.
  INSERT INTO edge_stream_ranges (gateway_id, stream_id, first_seq, last_seq)
  SELECT p_gateway, p_stream, u.f, u.l FROM unnest(p_firsts, p_lasts) AS u(f, l)
  WHERE u.l > w
  ON CONFLICT DO NOTHING;

  IF EXISTS (SELECT 1 FROM unnest(p_lasts) AS u(l) WHERE u.l > w) THEN
    -- Walk the pending ranges in order: each one touching [1..w] extends w. (first_seq - 1,
    -- not w + 1: w may be 2^63 - 1.)
    FOR r IN
      SELECT first_seq, last_seq FROM edge_stream_ranges
      WHERE gateway_id = p_gateway AND stream_id = p_stream
      ORDER BY first_seq
    LOOP
      EXIT WHEN r.first_seq - 1 > w;
      w := greatest(w, r.last_seq);
    END LOOP;
    DELETE FROM edge_stream_ranges
    WHERE gateway_id = p_gateway AND stream_id = p_stream AND last_seq <= w;
  END IF;

  UPDATE edge_streams SET acked_seq = w, last_seen = now()
  WHERE gateway_id = p_gateway AND stream_id = p_stream;
  RETURN w;
END
$fn$;
"""

# (version, description, SQL). Append new versions; never edit an applied one.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "edge_events (monthly partitions), edge_streams, edge_stream_ranges, edge_gaps", _V1),
    (2, "edge_commit_ranges: a batch's range and its gap events' declared ranges", _V2),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS edge_schema_version (
  version integer PRIMARY KEY,
  description text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(conn: Any) -> int:
    """Bring the schema to SCHEMA_VERSION (idempotent, replica-safe); return the version."""
    async with conn.transaction():
        # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalogs: serialise.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(_VERSION_TABLE)
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM edge_schema_version")
        for version, description, sql in MIGRATIONS:
            if version <= current:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO edge_schema_version (version, description) VALUES ($1, $2)",
                version,
                description,
            )
        return max(int(current), SCHEMA_VERSION)
