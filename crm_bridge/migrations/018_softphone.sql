-- closeloop schema, version 18: agents who take voice handoffs in the browser (the console's
-- softphone) instead of on their phone; and which way a transfer reached its agent.

-- On: a voice handoff rings this agent's console and is bridged over WebRTC by the server; the
-- Twilio conference transfer (to the agent's phone) skips them.
ALTER TABLE agents ADD COLUMN softphone boolean NOT NULL DEFAULT false;

-- 'phone': a Twilio conference rings the agent's phone; 'browser': the caller stays on their own
-- leg and the server relays audio to the agent's console (agent_call_sid is then NULL).
ALTER TABLE transfers ADD COLUMN via text NOT NULL DEFAULT 'phone' CHECK (via IN ('phone', 'browser'));
