-- Unique codes: a coupon's single-use codes, each handed to at most one live claim.
-- Under each coupon's lock, for a coupon with codes (code_count > 0): its codes with no claim
-- == available_count; those above code_cursor are fresh, those at or below it are exactly
-- the ones in returned_codes. A code's claim_id only changes under its coupon's lock.

ALTER TABLE coupons
    -- How many unique codes the coupon has (0: a plain coupon, whose claims read no codes).
    ADD COLUMN code_count BIGINT NOT NULL DEFAULT 0,
    -- The highest id of its codes handed out so far: claims take fresh codes above it, in id
    -- order, by the (coupon_id, id) index, which assignments never change.
    ADD COLUMN code_cursor BIGINT UNSIGNED NOT NULL DEFAULT 0,
    -- How many of its codes at or below code_cursor came back (rows in returned_codes): 0
    -- spares a claim the look-up.
    ADD COLUMN codes_returned BIGINT NOT NULL DEFAULT 0;

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
    -- The held, claimed or redeemed claim holding the code; NULL: unassigned. Not indexed:
    -- an assignment changes the row only (a claim finds its code by claims.assigned_code).
    claim_id BIGINT UNSIGNED NULL,
    UNIQUE KEY coupon_codes_code (code),
    -- A coupon's codes in id order: the fresh ones above its cursor, and the admin list.
    KEY coupon_codes_by_coupon (coupon_id, id)
    -- No foreign key to coupons: its check would share-lock the coupon's row for the whole of
    -- an import, stopping the coupon's claims.
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Codes given back at or below their coupon's cursor: handed out again first.
CREATE TABLE IF NOT EXISTS returned_codes (
    code_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    coupon_id BIGINT UNSIGNED NOT NULL,
    KEY returned_codes_by_coupon (coupon_id, code_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per coupon that ever had codes added: an add locks it, so adds to one coupon run
-- one after the other, and each one's codes get ids above every earlier one's (and above the
-- cursor), without locking the coupon's row until its end.
CREATE TABLE IF NOT EXISTS code_adds (
    coupon_id BIGINT UNSIGNED NOT NULL PRIMARY KEY
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
