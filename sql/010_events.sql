-- The event feed: every change writes its event in the change's own transaction, with `seq`
-- NULL. A sequencer later numbers committed events in order (`seq`, the id the feed shows),
-- one sequencer at a time (the `event_sequence` row's lock), so a reader asking for the events
-- after the last one it saw never skips one that committed late with a smaller `id`.
CREATE TABLE IF NOT EXISTS events (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- The feed's id: NULL until sequenced, then unique and rising in commit order.
    seq BIGINT UNSIGNED NULL,
    -- coupon.created, claim.redeemed, ...
    type VARCHAR(32) CHARACTER SET ascii NOT NULL,
    -- The object as the change left it, as JSON.
    data TEXT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    -- The feed reads by seq; the sequencer finds seq IS NULL here too.
    KEY events_seq (seq),
    KEY events_type_seq (type, seq)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row: the last seq given. Its row lock makes one sequencer run at a time.
CREATE TABLE IF NOT EXISTS event_sequence (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    last_seq BIGINT UNSIGNED NOT NULL
) ENGINE=InnoDB;
INSERT IGNORE INTO event_sequence (id, last_seq) VALUES (1, 0);
