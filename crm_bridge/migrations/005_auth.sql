-- closeloop schema, version 5: sign-in throttling.
-- Failed password attempts per email (lower-cased, whether or not a user has that email, so the
-- throttle says nothing about which accounts exist). Five failures inside 15 minutes lock the
-- email for 15 minutes; a successful sign-in deletes the row.
CREATE TABLE login_throttle (
    email        text PRIMARY KEY,
    failures     integer NOT NULL CHECK (failures >= 0),
    window_start timestamptz NOT NULL,
    locked_until timestamptz
);
