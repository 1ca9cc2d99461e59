-- closeloop schema, version 13: what the admin console edits beyond intents.

-- Business hours of a queue: a time zone (IANA name) and, per weekday ('mon' .. 'sun'), a list
-- of 'HH:MM-HH:MM' intervals, e.g. {"mon": ["09:00-17:00"], "sat": ["10:00-14:00"]}. An empty
-- object means the queue never closes (what every queue was before). crm_bridge.business_hours
-- validates and reads them.
ALTER TABLE queues ADD COLUMN timezone text NOT NULL DEFAULT 'UTC';
ALTER TABLE queues ADD COLUMN business_hours jsonb NOT NULL DEFAULT '{}';
-- Where work of this queue may go when it cannot be served here: another queue, never itself.
ALTER TABLE queues ADD COLUMN overflow_queue text REFERENCES queues(name) ON DELETE SET NULL;
ALTER TABLE queues ADD CONSTRAINT queues_overflow_not_self CHECK (overflow_queue IS NULL OR overflow_queue <> name);

-- How the intent matcher decides, as set on the admin page (one row; absent until an admin
-- changes something, then it wins over CLOSELOOP_INTENT_THRESHOLD and the built-in defaults):
-- the lowest score that counts as a match, the lead the best intent needs over the runner-up,
-- and how many turns in a row may match nothing before the conversation goes to a person.
CREATE TABLE intent_matching (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    threshold   double precision NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
    margin      double precision NOT NULL CHECK (margin >= 0 AND margin <= 1),
    max_misses  integer NOT NULL CHECK (max_misses BETWEEN 1 AND 10),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
