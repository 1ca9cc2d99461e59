-- closeloop schema, version 16: web chat sockets record the node that holds them.

-- One row per open web-chat socket (a customer's page may reconnect many times: each connection is
-- a row). When a node is lost, another node closes its rows (close_reason 'node_lost') and notes it
-- in the conversation; the page reconnects through the proxy to a live node and carries on.
CREATE TABLE chat_sessions (
    id               bigserial PRIMARY KEY,
    conversation_id  bigint NOT NULL REFERENCES conversations(id),
    node_id          text NOT NULL REFERENCES nodes(id),
    opened_at        timestamptz NOT NULL,
    closed_at        timestamptz,
    close_reason     text
);
CREATE INDEX chat_sessions_open_by_node_idx ON chat_sessions (node_id) WHERE closed_at IS NULL;
CREATE INDEX chat_sessions_conversation_idx ON chat_sessions (conversation_id);
