-- closeloop schema, version 3: people (users, sessions, API tokens), queues, agents, assignments.

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    email         text NOT NULL,
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('agent', 'supervisor', 'admin')),
    password_hash text NOT NULL,            -- argon2id
    phone         text,                     -- where an agent is reached for warm transfers
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_idx ON users (lower(email));

-- Browser sessions: only a hash of the cookie value is stored.
CREATE TABLE sessions (
    token_hash   text PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL
);
CREATE INDEX sessions_user_idx ON sessions (user_id);

-- API tokens for integrations (Authorization: Bearer ...); only a hash is stored.
CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         text NOT NULL,
    token_hash   text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL,
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE queues (
    name        text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    skills      text[] NOT NULL DEFAULT '{}',
    -- SLA minutes per priority, e.g. {"urgent": 5, "high": 15, "normal": 60, "low": 240}
    sla_first_response jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    user_id     bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    presence    text NOT NULL DEFAULT 'away' CHECK (presence IN ('available', 'busy', 'away')),
    capacity    integer NOT NULL DEFAULT 3 CHECK (capacity >= 0),
    active      integer NOT NULL DEFAULT 0 CHECK (active >= 0),   -- assignments accepted or offered
    skills      text[] NOT NULL DEFAULT '{}',
    queues      text[] NOT NULL DEFAULT '{}',
    last_assigned_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One assignment per handoff at a time: an offer to an agent, then accepted/declined/expired.
CREATE TABLE assignments (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    ticket_id       bigint REFERENCES tickets(id),
    agent_id        bigint NOT NULL REFERENCES users(id),
    queue           text NOT NULL,
    status          text NOT NULL CHECK (status IN ('offered', 'accepted', 'declined', 'expired', 'completed', 'handed_back')),
    offered_at      timestamptz NOT NULL,
    responded_at    timestamptz,
    ended_at        timestamptz
);
CREATE UNIQUE INDEX assignments_one_live_idx ON assignments (conversation_id) WHERE status IN ('offered', 'accepted');
CREATE INDEX assignments_agent_idx ON assignments (agent_id, status);

-- Handoffs waiting for an agent (FOR UPDATE SKIP LOCKED makes several processes safe).
CREATE TABLE handoffs (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    ticket_id       bigint REFERENCES tickets(id),
    queue           text NOT NULL,
    priority        text NOT NULL,
    status          text NOT NULL DEFAULT 'waiting' CHECK (status IN ('waiting', 'offered', 'assigned', 'cancelled')),
    tried_agents    bigint[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE UNIQUE INDEX handoffs_one_open_idx ON handoffs (conversation_id) WHERE status IN ('waiting', 'offered');
CREATE INDEX handoffs_waiting_idx ON handoffs (queue, created_at) WHERE status = 'waiting';

-- Notifications for people (SLA breaches for supervisors, incoming handoffs for agents).
CREATE TABLE notifications (
    id         bigserial PRIMARY KEY,
    user_id    bigint REFERENCES users(id) ON DELETE CASCADE,  -- NULL: everyone with the role
    role       text,
    kind       text NOT NULL,
    data       jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    read_at    timestamptz
);
CREATE INDEX notifications_user_idx ON notifications (user_id, created_at DESC);
CREATE INDEX notifications_role_idx ON notifications (role, created_at DESC);

INSERT INTO queues (name, description, sla_first_response) VALUES
    ('support', 'General support', '{"urgent": 5, "high": 15, "normal": 60, "low": 240}'),
    ('billing', 'Refunds, payments and balances', '{"urgent": 5, "high": 15, "normal": 60, "low": 240}'),
    ('sales', 'Pre-sales questions', '{"urgent": 10, "high": 30, "normal": 120, "low": 480}')
ON CONFLICT DO NOTHING;
