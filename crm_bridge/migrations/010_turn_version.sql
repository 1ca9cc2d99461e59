-- closeloop schema, version 10: optimistic turns.
--
-- A turn reads the conversation, thinks (engine, LLM, tools) without a transaction or a row lock,
-- then commits only if the conversation's version is still the one it read. The version moves
-- on EVERY update of the row, whoever makes it (a turn, an agent taking over, a message appended
-- by the desk or a job, a barge-in, a transfer), so no writer can be overwritten by a turn that
-- read the row before it: the turn sees a conflict and re-runs on the fresh state.
ALTER TABLE conversations ADD COLUMN version bigint NOT NULL DEFAULT 0;

CREATE FUNCTION conversations_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER conversations_version BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION conversations_bump_version();
