-- closeloop schema, version 6: warm transfers of phone calls to agents' phones.

-- One transfer per handed-off call. The conference name carries no personal data
-- ("cl-transfer-<id>"). status: dialing -> ringing -> answered -> connected, or
-- ringing -> (next agent) ... -> fallback; abandoned when the caller leaves; failed when the
-- caller's call could not be moved.
CREATE TABLE transfers (
    id              bigserial PRIMARY KEY,
    call_sid        text NOT NULL,
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    ticket_id       bigint REFERENCES tickets(id),
    queue           text NOT NULL,
    conference_name text UNIQUE,
    status          text NOT NULL DEFAULT 'dialing'
                    CHECK (status IN ('dialing', 'ringing', 'answered', 'connected', 'completed', 'fallback', 'abandoned', 'failed')),
    agent_id        bigint REFERENCES users(id),
    agent_call_sid  text,
    assignment_id   bigint REFERENCES assignments(id),
    tried_agents    bigint[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
-- One live transfer per call.
CREATE UNIQUE INDEX transfers_one_live_idx ON transfers (call_sid) WHERE status IN ('dialing', 'ringing', 'answered', 'connected');
CREATE INDEX transfers_agent_call_idx ON transfers (agent_call_sid);

-- Every step with its Twilio SIDs and outcome. Callback steps carry a natural key
-- (CallSid + CallStatus, ConferenceSid + event + participant): a retried callback is a no-op.
CREATE TABLE transfer_steps (
    id          bigserial PRIMARY KEY,
    transfer_id bigint NOT NULL REFERENCES transfers(id),
    step        text NOT NULL,
    twilio_sid  text,
    outcome     text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    dedupe_key  text UNIQUE,
    created_at  timestamptz NOT NULL
);
CREATE INDEX transfer_steps_transfer_idx ON transfer_steps (transfer_id, id);

-- Calls we promised to return when no agent could take a transfer.
CREATE TABLE callbacks (
    id              bigserial PRIMARY KEY,
    transfer_id     bigint UNIQUE REFERENCES transfers(id),
    conversation_id bigint REFERENCES conversations(id),
    ticket_id       bigint REFERENCES tickets(id),
    queue           text NOT NULL,
    phone           text,
    due_at          timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled', 'done', 'cancelled')),
    created_at      timestamptz NOT NULL
);
CREATE INDEX callbacks_due_idx ON callbacks (due_at) WHERE status = 'scheduled';
