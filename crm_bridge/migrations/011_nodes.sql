-- closeloop schema, version 11: the nodes of a fleet and what each of them holds.

-- Every `closeloop serve` process registers itself and heartbeats; a node whose heartbeat is
-- older than the timeout is lost: another node ends its calls (end_reason 'node_lost') and owes a
-- call back to each caller who was waiting for a person.
CREATE TABLE nodes (
    id            text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL,
    draining      boolean NOT NULL DEFAULT false,
    stopped_at    timestamptz,            -- left cleanly
    lost_at       timestamptz             -- found dead by another node
);
CREATE INDEX nodes_live_idx ON nodes (heartbeat_at) WHERE stopped_at IS NULL AND lost_at IS NULL;

-- The node whose process runs the call's media stream.
ALTER TABLE calls ADD COLUMN node_id text REFERENCES nodes(id);
CREATE INDEX calls_live_by_node_idx ON calls (node_id) WHERE ended_at IS NULL;
