-- closeloop schema, version 8: who may open a call's media stream, and the carrier's attestation.

-- The SHAKEN/STIR verification Twilio reported in the signed voice webhook (`StirVerstat`,
-- e.g. 'TN-Validation-Passed-A'); NULL when absent.
ALTER TABLE calls ADD COLUMN stir_verstat text;
-- When the per-call media stream token was used: a token opens one stream, once.
ALTER TABLE calls ADD COLUMN token_used_at timestamptz;
