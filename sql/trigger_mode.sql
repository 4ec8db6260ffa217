-- walbridge trigger mode: bookkeeping objects, created by `walbridge setup` on every node of a
-- deployment in which some node is in trigger mode (after sql/schema.sql). Idempotent.
-- The change table, its dead-letter twin and the capture function are in
-- sql/trigger_change_table.sql and sql/trigger_capture.sql (templates filled by setup).

-- On every target T: how far T has applied the change table of each trigger-mode source S,
-- written in the same transaction as the data. Every row of S's change table with
-- id <= last_id that was visible then has been applied (or dead-lettered); rows with a smaller
-- id that were not yet visible belong to transactions >= hold_xid, and those of them already
-- applied are listed in walbridge.trigger_applied.
CREATE TABLE IF NOT EXISTS walbridge.trigger_progress (
    source     text PRIMARY KEY,
    last_id    bigint NOT NULL,
    hold_xid   xid8 NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- On every target T: rows of S applied here whose transaction is >= S's hold_xid (late
-- committers below last_id). Kept small: rows fall out as hold_xid passes them.
CREATE TABLE IF NOT EXISTS walbridge.trigger_applied (
    source text   NOT NULL,
    id     bigint NOT NULL,
    txid   xid8   NOT NULL,
    PRIMARY KEY (source, id)
);

-- On a trigger-mode source S with several peers: each peer's progress as last published to S
-- after its commit. Only a hint for deleting rows every peer has applied; the authority is
-- walbridge.trigger_progress on the peer.
CREATE TABLE IF NOT EXISTS walbridge.trigger_peer_progress (
    target     text PRIMARY KEY,
    last_id    bigint NOT NULL,
    hold_xid   xid8 NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

REVOKE ALL ON walbridge.trigger_progress, walbridge.trigger_applied,
              walbridge.trigger_peer_progress FROM PUBLIC;

-- Statement-level AFTER INSERT trigger on the change table: one NOTIFY per statement, merged
-- by PostgreSQL into one per transaction, wakes the workers at once (rows written by old
-- triggers or by hand included).
CREATE OR REPLACE FUNCTION walbridge.notify_changes() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION walbridge.notify_changes() FROM PUBLIC;
