-- What a coupon is worth, and the admin's own metadata. A coupon has a percentage off, or an
-- amount off in a currency, or neither (a coupon without value, as before); never both. These
-- checks mirror the service's (coupon::check_terms), so a row the service would refuse cannot be
-- written by hand either.

ALTER TABLE coupons
    -- 1 to 100 percent off the order.
    ADD COLUMN percent_off INT NULL,
    -- Minor units of `currency` off the order (cents for EUR), 1 to 10^12.
    ADD COLUMN amount_off BIGINT NULL,
    -- Three upper-case letters (ISO 4217): required with amount_off or min_order_amount.
    ADD COLUMN currency CHAR(3) CHARACTER SET ascii NULL,
    -- The least order, in minor units of `currency`, the coupon applies to: 0 to 10^12.
    ADD COLUMN min_order_amount BIGINT NULL,
    -- A JSON object of strings (at most 50 keys); NULL: none.
    ADD COLUMN metadata TEXT NULL,
    ADD CONSTRAINT coupons_percent_off_range
        CHECK (percent_off IS NULL OR percent_off BETWEEN 1 AND 100),
    ADD CONSTRAINT coupons_amount_off_range
        CHECK (amount_off IS NULL OR amount_off BETWEEN 1 AND 1000000000000),
    ADD CONSTRAINT coupons_min_order_range
        CHECK (min_order_amount IS NULL OR min_order_amount BETWEEN 0 AND 1000000000000),
    ADD CONSTRAINT coupons_one_value CHECK (percent_off IS NULL OR amount_off IS NULL),
    ADD CONSTRAINT coupons_currency_shape
        CHECK (currency IS NULL OR currency COLLATE ascii_bin REGEXP '^[A-Z]{3}$'),
    ADD CONSTRAINT coupons_amounts_have_currency
        CHECK (currency IS NOT NULL OR (amount_off IS NULL AND min_order_amount IS NULL)),
    ADD CONSTRAINT coupons_metadata_json CHECK (metadata IS NULL OR JSON_VALID(metadata));

-- A coupon's audit entry holds the whole coupon (or its metadata before and after): metadata of
-- up to 64 KiB makes that more than a TEXT holds.
ALTER TABLE audit_log MODIFY detail MEDIUMTEXT NOT NULL;
