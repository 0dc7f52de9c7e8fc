-- A key keeps the SHA-256 of its request's canonical text (64 hex digits) instead of the text
-- in VARCHAR(400): a coupon created with a key and a long description did not fit (a 500 under
-- a strict SQL mode; in a non-strict one the text was cut, so two requests differing past the
-- cut looked alike). Keys recorded before (kept 24 hours) are converted, not dropped: SHA2()
-- digests the text's UTF-8 bytes as the service does, so their retries still replay. A text
-- cut by a non-strict mode matched no retry before and matches none after.
UPDATE idempotency_keys SET request = SHA2(request, 256);
ALTER TABLE idempotency_keys
    CHANGE request request_sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
