-- closeloop schema, version 12: the audit log of admin changes.

-- One row per change made through the admin console's API and the intent endpoints: who (the
-- user's id and email at the time, kept even if the user is later removed), when, what (a kind
-- such as 'intent.update' and its target, e.g. the intent's name) and the value before and after
-- as JSON (NULL before a create, NULL after a delete). Rows are only ever added: no route updates
-- or deletes them, and the trigger below refuses UPDATE and DELETE from any client.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    user_id     bigint,
    user_email  text NOT NULL,
    kind        text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_recent_idx ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_target_idx ON audit_log (kind, target);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
