-- The event feed: every change writes its events in the change's own transaction, as one row
-- (a claim batch's many claims: one row, not one per claim), unnumbered. A sequencer later
-- numbers committed rows in order, one sequencer at a time (the `event_sequence` row's lock):
-- the row's events get the feed ids seq_first to seq_last. So a reader asking for the events
-- after the last id it saw never skips one that committed late with a smaller `id`.
CREATE TABLE IF NOT EXISTS events (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- The feed ids of this row's events: NULL until sequenced, then rising in commit order.
    seq_first BIGINT UNSIGNED NULL,
    seq_last BIGINT UNSIGNED NULL,
    -- How many events the row holds.
    n INT UNSIGNED NOT NULL,
    -- The events, in order, as a JSON array of {"type": ..., "data": ...}: each object as the
    -- change left it.
    events MEDIUMTEXT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    -- The feed reads by seq_last; the sequencer finds seq_last IS NULL here too.
    KEY events_seq (seq_last)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row: the last feed id given. Its row lock makes one sequencer run at a time.
CREATE TABLE IF NOT EXISTS event_sequence (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    last_seq BIGINT UNSIGNED NOT NULL
) ENGINE=InnoDB;
INSERT IGNORE INTO event_sequence (id, last_seq) VALUES (1, 0);
