-- closeloop schema, version 4: routing details on top of 003 (queues, agents, handoffs).

-- Which handoff an offer belongs to: a declined or expired offer puts exactly that handoff back.
ALTER TABLE assignments ADD COLUMN handoff_id bigint REFERENCES handoffs(id);
CREATE INDEX assignments_offered_idx ON assignments (offered_at) WHERE status = 'offered';

-- Notifications that must exist at most once (one SLA-breach alert per ticket and SLA) carry a
-- natural key; ON CONFLICT DO NOTHING makes a repeated job pass or a second process a no-op.
ALTER TABLE notifications ADD COLUMN dedupe_key text;
CREATE UNIQUE INDEX notifications_dedupe_idx ON notifications (dedupe_key) WHERE dedupe_key IS NOT NULL;

-- Waiting handoffs in the order they are served: priority, then age.
CREATE INDEX handoffs_serve_idx ON handoffs (
    (CASE priority WHEN 'urgent' THEN 0 WHEN 'high' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END), created_at, id
) WHERE status = 'waiting';
