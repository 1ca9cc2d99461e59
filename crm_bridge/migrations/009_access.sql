-- closeloop schema, version 9: web-chat session secrets stored as hashes; sign-in throttle per
-- client address.

-- The web chat's session id lets whoever holds it continue the conversation, so only its SHA-256
-- is kept ('sha256:' || hex, the same as web.chat_routes.webchat_address): the browser keeps the
-- secret, the server hashes what a client presents to find the conversation.
UPDATE conversations SET address = 'sha256:' || encode(sha256(convert_to(address, 'UTF8')), 'hex')
 WHERE channel = 'webchat' AND address NOT LIKE 'sha256:%';
UPDATE followups SET address = 'sha256:' || encode(sha256(convert_to(address, 'UTF8')), 'hex')
 WHERE channel = 'webchat' AND address NOT LIKE 'sha256:%';
UPDATE outbox SET address = 'sha256:' || encode(sha256(convert_to(address, 'UTF8')), 'hex')
 WHERE channel = 'webchat' AND address NOT LIKE 'sha256:%';
-- Inbound web-chat message ids were 'webchat:<session>:<client id>' (a session has no ':').
UPDATE messages
   SET external_id = 'webchat:sha256:' || encode(sha256(convert_to(split_part(external_id, ':', 2), 'UTF8')), 'hex')
                     || substr(external_id, length('webchat:' || split_part(external_id, ':', 2)) + 1)
 WHERE direction = 'in' AND external_id LIKE 'webchat:%' AND external_id NOT LIKE 'webchat:sha256:%';

-- Failed sign-ins per client address (any email), next to login_throttle's per-email count.
-- The count is taken before the password is checked, so parallel guesses cannot overrun it.
CREATE TABLE login_throttle_clients (
    client       text PRIMARY KEY,
    failures     integer NOT NULL CHECK (failures >= 0),
    window_start timestamptz NOT NULL,
    locked_until timestamptz
);
