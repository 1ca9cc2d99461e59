-- closeloop schema, version 2: phone calls.

-- What the caller actually heard: a bot turn cut by a barge-in keeps only the heard words in
-- `body`, is flagged `interrupted`, and keeps the full text it was going to say in `meta`.
ALTER TABLE messages ADD COLUMN interrupted boolean NOT NULL DEFAULT false;
ALTER TABLE messages ADD COLUMN meta jsonb;

CREATE TABLE calls (
    call_sid        text PRIMARY KEY,
    conversation_id bigint REFERENCES conversations(id),
    stream_sid      text,
    caller          text,
    called          text,
    status          text NOT NULL DEFAULT 'ringing',
    end_reason      text,
    started_at      timestamptz NOT NULL,
    answered_at     timestamptz,
    ended_at        timestamptz
);

-- Status callbacks, deduplicated on their natural key (CallSid + CallStatus).
CREATE TABLE call_status_events (
    call_sid     text NOT NULL,
    status       text NOT NULL,
    sequence     integer,
    duration_s   integer,
    payload      jsonb NOT NULL DEFAULT '{}',
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (call_sid, status)
);
