-- Identity levels (anonymous, claimed, verified) per conversation, per-intent identity needs,
-- and one-time verification codes (stored hashed, with attempts and expiry).

ALTER TABLE intents ADD COLUMN identity text NOT NULL DEFAULT 'verified'
    CHECK (identity IN ('claimed', 'verified'));

ALTER TABLE conversations
    ADD COLUMN identity_level  text NOT NULL DEFAULT 'anonymous'
        CHECK (identity_level IN ('anonymous', 'claimed', 'verified')),
    ADD COLUMN identity_method text,
    ADD COLUMN identity_at     timestamptz,
    ADD COLUMN claimed_ref     text;

-- Conversations that knew their customer before identity levels existed keep it as a claim:
-- account actions ask for a code again.
UPDATE conversations SET identity_level = 'claimed', identity_method = 'legacy', claimed_ref = customer_ref,
                         identity_at = updated_at
 WHERE customer_ref IS NOT NULL;

CREATE TABLE verification_codes (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL,     -- no FK: codes commit on their own, before a new conversation does
    customer_ref    text,                -- NULL: the contact matched no account (nothing was sent)
    client          text,                -- client address (web chat) for rate limiting
    channel         text,                -- where the code went: sms, whatsapp, email
    salt            text NOT NULL,
    code_hash       text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    created_at      timestamptz NOT NULL
);
CREATE INDEX verification_codes_conversation_idx ON verification_codes (conversation_id, created_at DESC);
CREATE INDEX verification_codes_customer_idx ON verification_codes (customer_ref, created_at DESC);
CREATE INDEX verification_codes_client_idx ON verification_codes (client, created_at DESC);
