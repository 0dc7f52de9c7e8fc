-- A claim's life: `held` until `expires_at` (then `expired`) unless confirmed (`claimed`) or
-- released (`released`); `held` or `claimed` claims are `redeemed` against an order; an admin
-- may void (`voided`) any live one. From here on, under each coupon's lock:
-- available_count + claims held, claimed or redeemed == total_count.
ALTER TABLE claims
    ADD COLUMN status ENUM('held', 'claimed', 'redeemed', 'released', 'expired', 'voided')
        CHARACTER SET ascii NOT NULL DEFAULT 'claimed',
    -- The end of a hold; NULL for a claim made without one.
    ADD COLUMN expires_at DATETIME(6) NULL,
    -- The redemption, once redeemed: the shop's order, and the discount it got.
    ADD COLUMN order_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN order_amount BIGINT NULL,
    ADD COLUMN order_currency CHAR(3) CHARACTER SET ascii NULL,
    ADD COLUMN discount_amount BIGINT NULL,
    ADD COLUMN redeemed_at DATETIME(6) NULL,
    -- The expiry sweep finds the holds that ran out without reading the rest.
    ADD KEY claims_holds (status, expires_at),
    -- Counts by status for each coupon, from the index alone.
    ADD KEY claims_by_coupon_status (coupon_id, status);
UPDATE claims SET status = 'voided' WHERE voided_at IS NOT NULL;
