-- Unique codes: a coupon's single-use codes, each handed to at most one live claim.
-- Under each coupon's lock: codes of the coupon with no claim == available_count, once it has
-- any (code_count > 0); a code's claim_id only changes under its coupon's lock.

ALTER TABLE coupons
    -- How many unique codes the coupon has (0: a plain coupon, whose claims read no codes).
    ADD COLUMN code_count BIGINT NOT NULL DEFAULT 0;

ALTER TABLE claims
    -- The unique code the claim was given, kept after the claim ends (the code itself goes
    -- back to its coupon then); NULL for a claim of a coupon without codes.
    ADD COLUMN assigned_code VARCHAR(64) CHARACTER SET ascii NULL;

CREATE TABLE IF NOT EXISTS coupon_codes (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    coupon_id BIGINT UNSIGNED NOT NULL,
    -- As generated or imported; unique case-insensitively here, and checked against coupons'
    -- live codes by both writers (see README, "Unique codes").
    code VARCHAR(64) CHARACTER SET ascii COLLATE ascii_general_ci NOT NULL,
    -- The held, claimed or redeemed claim holding the code; NULL: unassigned.
    claim_id BIGINT UNSIGNED NULL,
    UNIQUE KEY coupon_codes_code (code),
    -- A claim holds one code at most, and its give-back finds it by a point look-up.
    UNIQUE KEY coupon_codes_claim (claim_id),
    -- The unassigned codes of a coupon, oldest first, without reading the assigned ones.
    KEY coupon_codes_free (coupon_id, claim_id, id),
    -- A coupon's codes in id order, for the admin list.
    KEY coupon_codes_list (coupon_id, id),
    CONSTRAINT coupon_codes_coupon FOREIGN KEY (coupon_id) REFERENCES coupons (id),
    CONSTRAINT coupon_codes_claim FOREIGN KEY (claim_id) REFERENCES claims (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
