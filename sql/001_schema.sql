-- The coupons schema. Applied by `coupons migrate` and at every start; recorded in
-- schema_migrations. Never edit an applied file: add 002_*.sql instead.
-- Every timestamp is UTC, written by the service (never the session time zone).

CREATE TABLE IF NOT EXISTS users (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- Lower-cased by the service, so the binary collation still makes it case-insensitive.
    email VARCHAR(254) NOT NULL,
    -- bcrypt, "$2b$<cost>$<salt+hash>", always 60 characters.
    password_hash CHAR(60) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    -- Checked in the database on every admin request, so a demotion takes effect at once.
    role ENUM('USER', 'ADMIN') NOT NULL DEFAULT 'USER',
    created_at DATETIME(6) NOT NULL,
    UNIQUE KEY users_email (email)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS coupons (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- As the admin wrote it; compared case-insensitively (ascii_general_ci).
    code VARCHAR(64) CHARACTER SET ascii COLLATE ascii_general_ci NOT NULL,
    -- Remaining stock. Only changed under this row's lock (SELECT ... FOR UPDATE).
    available_count BIGINT NOT NULL,
    -- All stock ever made available: available_count + claims of this coupon, always.
    total_count BIGINT NOT NULL,
    status ENUM('ACTIVE', 'INACTIVE') NOT NULL DEFAULT 'ACTIVE',
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    -- Soft delete: set once, hides the coupon; its claims stay.
    deleted_at DATETIME(6) NULL,
    -- The code while the coupon is live, NULL once deleted: the unique key below then lets a
    -- deleted coupon's code be used again, while two live coupons can never share one.
    live_code VARCHAR(64) CHARACTER SET ascii COLLATE ascii_general_ci
        GENERATED ALWAYS AS (IF(deleted_at IS NULL, code, NULL)) STORED,
    UNIQUE KEY coupons_live_code (live_code),
    KEY coupons_listing (status, deleted_at, id),
    CONSTRAINT coupons_available_not_negative CHECK (available_count >= 0),
    CONSTRAINT coupons_available_within_total CHECK (available_count <= total_count)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per granted unit. Rows are never deleted or updated.
CREATE TABLE IF NOT EXISTS claims (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    coupon_id BIGINT UNSIGNED NOT NULL,
    claimed_at DATETIME(6) NOT NULL,
    -- A user's history, newest first, without a sort.
    KEY claims_user_history (user_id, id),
    KEY claims_by_coupon (coupon_id, id),
    CONSTRAINT claims_user FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT claims_coupon FOREIGN KEY (coupon_id) REFERENCES coupons (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
