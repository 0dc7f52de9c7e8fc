-- Coupon rules: a name and description for people, a per-user limit and a validity window;
-- and what a coupon was called when it was claimed.

ALTER TABLE coupons
    ADD COLUMN name VARCHAR(200) NULL,
    ADD COLUMN description VARCHAR(2000) NULL,
    -- Most claims one user may hold of this coupon; NULL: no limit (as the original service).
    ADD COLUMN per_user_limit INT NULL,
    -- Claimable from starts_at (inclusive) until ends_at (exclusive), UTC; NULL: open-ended.
    ADD COLUMN starts_at DATETIME(6) NULL,
    ADD COLUMN ends_at DATETIME(6) NULL,
    ADD CONSTRAINT coupons_limit_positive CHECK (per_user_limit IS NULL OR per_user_limit > 0),
    ADD CONSTRAINT coupons_window_ordered
        CHECK (starts_at IS NULL OR ends_at IS NULL OR starts_at < ends_at);

-- How many claims each user holds of each coupon that has a per-user limit. Only changed under
-- the coupon row's lock, so the limit holds however many requests one user sends at once.
CREATE TABLE IF NOT EXISTS user_coupon_claims (
    user_id BIGINT UNSIGNED NOT NULL,
    coupon_id BIGINT UNSIGNED NOT NULL,
    claimed INT NOT NULL,
    PRIMARY KEY (user_id, coupon_id),
    CONSTRAINT user_coupon_claims_user FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT user_coupon_claims_coupon FOREIGN KEY (coupon_id) REFERENCES coupons (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The coupon's code and name when the claim was made: a history shows them as they were.
-- NULL on claims made before this migration (the history then shows the current ones).
ALTER TABLE claims
    ADD COLUMN code VARCHAR(64) CHARACTER SET ascii NULL,
    ADD COLUMN name VARCHAR(200) NULL;
