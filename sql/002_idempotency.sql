-- Idempotency keys: a retried request with the same key gets the first answer again, never a
-- second claim. Written in the same transaction as what they record.

CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id BIGINT UNSIGNED NOT NULL,
    -- As the client sent it in the Idempotency-Key header: 1 to 255 printable ASCII characters.
    idem_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    -- What the request asked, e.g. "claim 42": the same key with another request is refused.
    request VARCHAR(400) NOT NULL,
    -- How it ended: "claimed", "created", or the error it got ("sold_out", "inactive", ...).
    outcome VARCHAR(32) CHARACTER SET ascii NOT NULL,
    -- The claim or coupon it made, if any.
    result_id BIGINT UNSIGNED NULL,
    -- For a claim: the stock left right after it, as first answered.
    result_count BIGINT NULL,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (user_id, idem_key),
    -- The purge of expired keys walks this index, away from the rows claims touch.
    KEY idempotency_keys_age (created_at),
    CONSTRAINT idempotency_keys_user FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
