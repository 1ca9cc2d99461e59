-- closeloop schema, version 17: what the agent console adds (canned replies, wrap-up codes, transfers).

-- Canned replies: short texts an agent inserts into the reply box (never sent by themselves),
-- a small set per queue, edited by admins through /api/desk/canned-replies.
CREATE TABLE canned_replies (
    id          bigserial PRIMARY KEY,
    queue       text NOT NULL REFERENCES queues(name) ON DELETE CASCADE,
    title       text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (queue, title)
);

-- Why the work ended, chosen by the agent who resolves or closes a ticket from the console
-- (crm_bridge.desk.WRAP_UP_CODES); NULL for tickets closed by other paths.
ALTER TABLE tickets ADD COLUMN wrap_up text;

-- An agent who hands their conversation to another agent or queue ends their assignment as 'transferred'.
ALTER TABLE assignments DROP CONSTRAINT assignments_status_check;
ALTER TABLE assignments ADD CONSTRAINT assignments_status_check
    CHECK (status IN ('offered', 'accepted', 'declined', 'expired', 'completed', 'handed_back', 'transferred'));
