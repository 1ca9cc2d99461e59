-- closeloop schema, version 14: call recordings (CLOSELOOP_RECORD_CALLS).

-- One stereo WAV per recorded call (caller left, bot right) under the data directory's
-- recordings/ folder. ``path`` is the file's name inside that folder: the route that plays it
-- reads the path from here only and refuses one that resolves outside the folder. A row lives
-- until ``expires_at`` (CLOSELOOP_RECORDING_RETENTION_DAYS after the call); the job runner then
-- deletes the file and the row. ``notice`` is what the caller was told before anything else.
CREATE TABLE recordings (
    id               bigserial PRIMARY KEY,
    conversation_id  bigint NOT NULL REFERENCES conversations(id),
    call_sid         text NOT NULL UNIQUE,
    path             text NOT NULL,
    duration_s       double precision NOT NULL,
    sample_rate      integer NOT NULL,
    redacted_spans   integer NOT NULL DEFAULT 0,
    notice           text NOT NULL,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL
);
CREATE INDEX recordings_conversation_idx ON recordings (conversation_id, id);
CREATE INDEX recordings_expires_idx ON recordings (expires_at);
