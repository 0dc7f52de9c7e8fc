-- Voided claims: a void returns one unit of stock, exactly once, and marks the claim; the row
-- stays. From here on: available_count + claims not voided == total_count.
ALTER TABLE claims
    ADD COLUMN voided_at DATETIME(6) NULL,
    ADD COLUMN voided_by BIGINT UNSIGNED NULL,
    ADD COLUMN void_reason VARCHAR(500) NULL;
