-- Webhooks: each endpoint gets the events it subscribed to, one at a time in feed order
-- (`events.seq`), signed with its secret, retried until a 2xx or 24 hours of failures. The
-- delivery state lives here, so a restart or a killed process loses nothing: an endpoint is
-- leased by one process at a time (`leased_until`, `lease`), and a killed process's lease runs out.
CREATE TABLE IF NOT EXISTS webhooks (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    url VARCHAR(2048) NOT NULL,
    -- JSON array of event types, or ["*"] for all.
    events TEXT NOT NULL,
    description VARCHAR(500) NULL,
    -- Signs deliveries; shown once, at creation.
    secret VARCHAR(128) CHARACTER SET ascii NOT NULL,
    created_at DATETIME(6) NOT NULL,
    deleted_at DATETIME(6) NULL,
    -- The feed id of the last event done: delivered, given up, or not subscribed to.
    delivered_seq BIGINT UNSIGNED NOT NULL,
    -- Failed attempts at the next event, and since when it has been failing.
    attempts INT UNSIGNED NOT NULL DEFAULT 0,
    failing_since DATETIME(6) NULL,
    next_attempt_at DATETIME(6) NOT NULL,
    -- Who delivers now: a random token per lease, and until when.
    lease BIGINT UNSIGNED NULL,
    leased_until DATETIME(6) NULL,
    KEY webhooks_due (next_attempt_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Every attempt at a delivery.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    webhook_id BIGINT UNSIGNED NOT NULL,
    -- The event's feed id.
    event_id BIGINT UNSIGNED NOT NULL,
    event_type VARCHAR(32) CHARACTER SET ascii NOT NULL,
    attempted_at DATETIME(6) NOT NULL,
    -- The receiver's status, or NULL when none came (then `error` says why).
    status_code SMALLINT UNSIGNED NULL,
    error VARCHAR(500) NULL,
    -- delivered, failed (retried at next_attempt_at) or gave_up (after 24 hours of failures).
    outcome ENUM('delivered', 'failed', 'gave_up') CHARACTER SET ascii NOT NULL,
    next_attempt_at DATETIME(6) NULL,
    KEY webhook_deliveries_by_webhook (webhook_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
