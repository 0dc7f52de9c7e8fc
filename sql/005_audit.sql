-- Who changed what, append-only: written in the same transaction as the change it records.
-- A coupon's `version` counts admin changes; it is the coupon's ETag, so that two admins cannot
-- overwrite each other unknowingly (If-Match).
ALTER TABLE coupons ADD COLUMN version INT NOT NULL DEFAULT 1;

CREATE TABLE IF NOT EXISTS audit_log (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- The admin who acted; 0 for a program using the library without a user.
    actor_id BIGINT UNSIGNED NOT NULL,
    -- coupon.create, coupon.update, coupon.delete, claim.void
    action VARCHAR(32) CHARACTER SET ascii NOT NULL,
    coupon_id BIGINT UNSIGNED NULL,
    claim_id BIGINT UNSIGNED NULL,
    -- What changed, as JSON: {"field": [old, new], ...}, or the new coupon, or the reason.
    detail TEXT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    KEY audit_log_coupon (coupon_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
