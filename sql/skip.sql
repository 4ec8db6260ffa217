-- `walbridge skip`: the way past a source transaction that cannot be applied. Created by
-- `walbridge setup` on every node, after sql/schema.sql; idempotent.

-- A direction that stopped on a definite error, recorded on its target by `walbridge run`:
-- what `walbridge skip` checks before it moves the target's origin past a transaction.
-- `end_lsn` is the end (commit) LSN of the source transaction that failed, NULL when the
-- error is not tied to one transaction. `skip` deletes the row in the transaction that moves
-- the origin; a running `walbridge run` sees it gone and starts the direction again.
CREATE TABLE IF NOT EXISTS walbridge.stopped (
    source     text NOT NULL,
    target     text NOT NULL,
    end_lsn    pg_lsn,
    error      text NOT NULL,
    stopped_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    PRIMARY KEY (source, target)
);

-- The changes of every skipped transaction, in order, to replay by hand if need be. `row` is
-- the new row (insert, update) or the old key / row (delete), column name to text value
-- (unchanged TOAST values left out); `old_key` the old key of an update that changed it.
-- Committed together with the target's origin progress, so a transaction is either skipped
-- and recorded here, or neither.
CREATE TABLE IF NOT EXISTS walbridge.skipped (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL,
    target      text NOT NULL,
    end_lsn     pg_lsn NOT NULL,
    commit_time timestamptz,
    xid         bigint,
    seq         integer NOT NULL,
    table_name  text,
    op          text NOT NULL,
    "row"       jsonb,
    old_key     jsonb,
    skipped_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
CREATE INDEX IF NOT EXISTS skipped_transaction ON walbridge.skipped (source, end_lsn, seq);
REVOKE ALL ON walbridge.stopped, walbridge.skipped FROM PUBLIC;
REVOKE ALL ON SEQUENCE walbridge.skipped_id_seq FROM PUBLIC;
