-- closeloop schema, version 1: built-in CRM, tickets, conversations, transcript, intents, jobs.
-- Money is integer minor units. Times are timestamptz (UTC).

CREATE TABLE customers (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL,
    phone         text UNIQUE,
    email         text UNIQUE,
    whatsapp_id   text UNIQUE,
    balance_cents bigint NOT NULL DEFAULT 0,
    currency      text NOT NULL DEFAULT 'USD',
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id            bigserial PRIMARY KEY,
    number        text NOT NULL UNIQUE,
    customer_id   bigint NOT NULL REFERENCES customers(id),
    items         jsonb NOT NULL DEFAULT '[]',
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    currency      text NOT NULL DEFAULT 'USD',
    status        text NOT NULL CHECK (status IN ('placed','shipped','delivered','cancelled','returned')),
    tracking_code text,
    placed_at     timestamptz NOT NULL,
    shipped_at    timestamptz,
    delivered_at  timestamptz,
    cancelled_at  timestamptz,
    returned_at   timestamptz
);
CREATE INDEX orders_customer_idx ON orders (customer_id);

CREATE TABLE payments (
    id            bigserial PRIMARY KEY,
    order_id      bigint NOT NULL REFERENCES orders(id),
    amount_cents  bigint NOT NULL,
    currency      text NOT NULL,
    provider_ref  text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- At most one refund per order: the UNIQUE constraint is the guarantee, not application code.
CREATE TABLE refunds (
    id              bigserial PRIMARY KEY,
    order_id        bigint NOT NULL UNIQUE REFERENCES orders(id),
    amount_cents    bigint NOT NULL CHECK (amount_cents > 0),
    currency        text NOT NULL,
    reason          text NOT NULL,
    provider_ref    text NOT NULL UNIQUE,
    idempotency_key text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL
);

CREATE TABLE return_labels (
    id                    bigserial PRIMARY KEY,
    order_id              bigint NOT NULL UNIQUE REFERENCES orders(id),
    code                  text NOT NULL UNIQUE,
    url                   text NOT NULL,
    warehouse_notified_at timestamptz,
    created_at            timestamptz NOT NULL
);

CREATE TABLE conversations (
    id              bigserial PRIMARY KEY,
    channel         text NOT NULL CHECK (channel IN ('whatsapp','sms','webchat','voice')),
    address         text NOT NULL,          -- phone, WhatsApp number, web session id or call SID
    customer_ref    text,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open','escalated','closed')),
    owner           text NOT NULL DEFAULT 'ai', -- 'ai', 'queue:<name>' or 'agent:<id>'
    intent          text,
    state           jsonb NOT NULL DEFAULT '{}',
    ticket_id       bigint,
    next_step       text,
    next_step_due   timestamptz,
    last_seq        integer NOT NULL DEFAULT 0,
    last_inbound_at timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX conversations_customer_idx ON conversations (customer_ref, created_at DESC);
CREATE INDEX conversations_address_idx ON conversations (channel, address, created_at DESC);
-- One open conversation per channel address at a time.
CREATE UNIQUE INDEX conversations_one_open_idx ON conversations (channel, address) WHERE status <> 'closed';

CREATE TABLE messages (
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    seq             integer NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('in','out')),
    sender          text NOT NULL,           -- customer, bot, agent, system
    body            text NOT NULL,
    external_id     text,                    -- MessageSid, web-chat client id, provider ref
    reply_to        integer,                 -- seq of the inbound message this answers
    kind            text NOT NULL DEFAULT 'message',
    created_at      timestamptz NOT NULL,
    tsv             tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED,
    PRIMARY KEY (conversation_id, seq)
);
CREATE UNIQUE INDEX messages_external_idx ON messages (external_id) WHERE external_id IS NOT NULL AND direction = 'in';
CREATE INDEX messages_tsv_idx ON messages USING gin (tsv);

CREATE TABLE events (
    id              bigserial PRIMARY KEY,
    conversation_id bigint REFERENCES conversations(id),
    ticket_id       bigint,
    kind            text NOT NULL,
    data            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL
);
CREATE INDEX events_conversation_idx ON events (conversation_id, id);

CREATE SEQUENCE ticket_protocol_seq START 100;
CREATE TABLE tickets (
    id                  bigserial PRIMARY KEY,
    protocol            text NOT NULL UNIQUE,
    dedupe_key          text UNIQUE,
    status              text NOT NULL CHECK (status IN ('open','pending','resolved','closed')),
    priority            text NOT NULL CHECK (priority IN ('low','normal','high','urgent')),
    queue               text NOT NULL,
    owner               text,
    subject             text NOT NULL,
    summary             text NOT NULL DEFAULT '',
    customer_ref        text,
    conversation_id     bigint REFERENCES conversations(id),
    first_response_due  timestamptz,
    resolution_due      timestamptz,
    first_response_at   timestamptz,
    resolved_at         timestamptz,
    next_step           text,
    next_step_due       timestamptz,
    sla_breached        text[] NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX tickets_queue_idx ON tickets (queue, status);
CREATE INDEX tickets_sla_idx ON tickets (status, first_response_due, resolution_due);

CREATE TABLE followups (
    id              bigserial PRIMARY KEY,
    dedupe_key      text UNIQUE,
    conversation_id bigint REFERENCES conversations(id),
    ticket_id       bigint REFERENCES tickets(id),
    customer_ref    text,
    channel         text NOT NULL,
    address         text NOT NULL,
    body            text NOT NULL,
    due_at          timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled','sent','failed','cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    provider_ref    text,
    channel_used    text,
    sent_at         timestamptz,
    created_at      timestamptz NOT NULL
);
CREATE INDEX followups_due_idx ON followups (due_at) WHERE status = 'scheduled';

-- Outbox: texts to send outside the request/response exchange (return label links...).
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    conversation_id bigint REFERENCES conversations(id),
    message_seq     integer,
    channel         text NOT NULL,
    address         text NOT NULL,
    body            text NOT NULL,
    kind            text NOT NULL,
    status          text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued','sent','failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    provider_ref    text,
    channel_used    text,
    sent_at         timestamptz,
    created_at      timestamptz NOT NULL
);
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at) WHERE status = 'queued';

CREATE TABLE intents (
    name                       text PRIMARY KEY,
    description                text NOT NULL DEFAULT '',
    examples                   jsonb NOT NULL DEFAULT '[]',
    action                     text NOT NULL,
    required_slots             jsonb NOT NULL DEFAULT '[]',
    policy                     text NOT NULL CHECK (policy IN ('autonomous','confirm')),
    queue                      text NOT NULL,
    priority                   text NOT NULL CHECK (priority IN ('low','normal','high','urgent')),
    sla_first_response_minutes integer NOT NULL,
    sla_resolution_minutes     integer NOT NULL,
    answer                     text,
    enabled                    boolean NOT NULL DEFAULT true,
    updated_at                 timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE settings_kv (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);
