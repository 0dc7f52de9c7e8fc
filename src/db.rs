//! The connection pool, the schema, and the two ways library code touches the database:
//! `with_conn` for plain reads and writes, `transaction` for a unit of work that retries.

use crate::gate::Gate;
use crate::Error;
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder, Transaction, TxOpts};
use r2d2_mysql::MySqlConnectionManager;
use std::hash::{BuildHasher, Hasher};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The pool every library function takes. Cheap to clone; share it between threads.
#[derive(Clone)]
pub struct Pool {
    inner: r2d2::Pool<Manager>,
    gate: Arc<Gate>,
    stats: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    waiting: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
}

/// What a pool has been doing, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections lent out now.
    pub in_use: u32,
    /// Connections open and idle now.
    pub idle: u32,
    /// Callers waiting for a connection now.
    pub waiting: u64,
    /// Database errors so far (unavailable or failed statements; refusals do not count).
    pub errors: u64,
    /// Transactions retried so far after a deadlock or lock-wait timeout.
    pub retries: u64,
}

impl Pool {
    /// The pool's numbers now.
    pub fn stats(&self) -> PoolStats {
        let state = self.inner.state();
        PoolStats {
            in_use: state.connections - state.idle_connections,
            idle: state.idle_connections,
            waiting: self.stats.waiting.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
            retries: self.stats.retries.load(Ordering::Relaxed),
        }
    }
}

/// The usual wait for a free connection before a caller gets [`Error::Unavailable`].
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection idle for longer than this is pinged before use; a busy one is not.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(5);
/// Whole-transaction attempts on deadlock or lock-wait timeout.
const MAX_ATTEMPTS: u32 = 8;
/// No retry starts after this long: a request is answered within a few seconds, not minutes.
const RETRY_BUDGET: Duration = Duration::from_secs(5);
/// How long one statement waits for a row lock (the server's default is 50 s).
const LOCK_WAIT_SECS: u32 = 2;

/// The migrations in `sql/`, in order. Applied ones are recorded in `schema_migrations` and
/// never edited; a change to the schema is a new file.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../sql/001_schema.sql")),
    (2, include_str!("../sql/002_idempotency.sql")),
    (3, include_str!("../sql/003_coupon_rules.sql")),
    (4, include_str!("../sql/004_voids.sql")),
    (5, include_str!("../sql/005_audit.sql")),
    (6, include_str!("../sql/006_request_digest.sql")),
    (7, include_str!("../sql/007_coupon_value.sql")),
    (8, include_str!("../sql/008_claim_life.sql")),
    (9, include_str!("../sql/009_codes.sql")),
    (10, include_str!("../sql/010_events.sql")),
    (11, include_str!("../sql/011_webhooks.sql")),
    (12, include_str!("../sql/012_claim_counts.sql")),
];

/// A pooled connection that remembers whether it failed and when it was last used.
pub struct Connection {
    conn: Conn,
    broken: bool,
    last_used: Instant,
}

impl Deref for Connection {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// An r2d2 manager over `r2d2_mysql` that avoids its two pings per checkout: a connection is
/// pinged only after being idle, and dropped when a query on it found the server gone.
#[derive(Debug)]
pub struct Manager {
    inner: MySqlConnectionManager,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = mysql::Error;

    fn connect(&self) -> Result<Connection, mysql::Error> {
        Ok(Connection {
            conn: self.inner.connect()?,
            broken: false,
            last_used: Instant::now(),
        })
    }

    fn is_valid(&self, c: &mut Connection) -> Result<(), mysql::Error> {
        if c.last_used.elapsed() > IDLE_BEFORE_PING {
            c.conn.ping()?;
        }
        Ok(())
    }

    fn has_broken(&self, c: &mut Connection) -> bool {
        c.last_used = Instant::now();
        c.broken
    }
}

/// Connection options from a `mysql://user:pass@host:port/db` URL (the `socket=PATH`
/// parameter selects a Unix socket). Unless the URL says otherwise, TCP stays TCP: the mysql
/// crate would otherwise open a second connection to switch to the server's socket. On a
/// Galera cluster, `wsrep_sync_wait=N` sets that session variable on every connection (1: reads
/// wait until the node has applied what the cluster committed, so a read after a write made
/// through another node sees it). `lock_wait_timeout=S` sets how long a statement waits for a
/// row lock, 1 to 3,600 s (default 2: a claim held up by a lock is retried, and answered
/// `Busy` after about 5 s).
pub fn opts_from_url(url: &str) -> Result<Opts, Error> {
    let (url, sync_wait) = take_param(url, "wsrep_sync_wait");
    let (url, lock_wait) = take_param(&url, "lock_wait_timeout");
    let opts = Opts::from_url(&url).map_err(|e| Error::invalid("database URL", e.to_string()))?;
    let lock_wait = match lock_wait {
        None => LOCK_WAIT_SECS,
        Some(v) => v
            .parse()
            .ok()
            .filter(|s| (1..=3600).contains(s))
            .ok_or_else(|| {
                Error::invalid(
                    "database URL",
                    "lock_wait_timeout must be a number of seconds from 1 to 3600",
                )
            })?,
    };
    let mut init = vec![format!(
        "SET SESSION innodb_lock_wait_timeout = {lock_wait}"
    )];
    if let Some(v) = sync_wait {
        let n: u8 = v.parse().ok().filter(|n| *n <= 15).ok_or_else(|| {
            Error::invalid(
                "database URL",
                "wsrep_sync_wait must be a number from 0 to 15",
            )
        })?;
        init.push(format!("SET SESSION wsrep_sync_wait = {n}"));
    }
    let mut b = OptsBuilder::from_opts(opts)
        .tcp_connect_timeout(Some(Duration::from_secs(2)))
        // A hung server must not pin a worker for ever; no statement of ours runs this long.
        .read_timeout(Some(Duration::from_secs(60)))
        .write_timeout(Some(Duration::from_secs(60)))
        .init(init)
        // Room for every statement, claim batches' power-of-two sizes included (about 90 with
        // batches of up to 64). The server's limit is 16,382 in all: 128 x 36 connections
        // leaves room for three processes.
        // The server's max_prepared_stmt_count (16,382) is shared by all connections.
        .stmt_cache_size(128);
    if !url.contains("prefer_socket=") {
        b = b.prefer_socket(false);
    }
    Ok(b.into())
}

/// `url` without the query parameter `name`, and that parameter's value.
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|p| match p.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_owned());
                false
            }
            _ => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, value)
}

/// A pool of up to `size` connections; a caller waits at most `wait` for a free one (see
/// [`CHECKOUT_TIMEOUT`]). It does not connect yet, so it can be built while the database is
/// down; the first use says whether it is reachable.
pub fn pool(opts: Opts, size: u32, wait: Duration) -> Result<Pool, Error> {
    let manager = Manager {
        inner: MySqlConnectionManager::new(OptsBuilder::from_opts(opts)),
    };
    let inner = r2d2::Pool::builder()
        .max_size(size.max(1))
        .min_idle(Some(0))
        .connection_timeout(wait)
        .test_on_check_out(true)
        .build_unchecked(manager);
    Ok(Pool {
        inner,
        gate: Arc::new(Gate::new(size as usize)),
        stats: Arc::default(),
    })
}

/// Creates the URL's database if it does not exist (needs the CREATE privilege; an error here
/// is returned, and a caller that knows the database exists may ignore it).
pub fn create_database(opts: &Opts) -> Result<(), Error> {
    let Some(name) = opts.get_db_name() else {
        return Err(Error::invalid("database URL", "names no database"));
    };
    if name.contains('`') {
        return Err(Error::invalid(
            "database URL",
            "database name contains a backquote",
        ));
    }
    let mut conn = Conn::new(OptsBuilder::from_opts(opts.clone()).db_name(None::<String>))?;
    conn.query_drop(format!(
        "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    ))?;
    Ok(())
}

/// Applies the migrations in `sql/` that are not applied yet. Safe to run at every start and
/// from several processes at once (a named lock serialises them); running it twice changes nothing.
pub fn migrate(pool: &Pool) -> Result<(), Error> {
    with_conn(pool, |conn| {
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INT NOT NULL PRIMARY KEY,
                applied_at DATETIME(6) NOT NULL
            ) ENGINE=InnoDB",
        )?;
        let locked: Option<Option<i64>> =
            conn.query_first("SELECT GET_LOCK(CONCAT('coupons.migrate.', DATABASE()), 60)")?;
        if locked.flatten() != Some(1) {
            return Err(Error::Internal("could not take the migration lock".into()));
        }
        let result = apply_pending(conn);
        conn.query_drop("DO RELEASE_LOCK(CONCAT('coupons.migrate.', DATABASE()))")?;
        result
    })
}

fn apply_pending(conn: &mut Connection) -> Result<(), Error> {
    for (version, sql) in MIGRATIONS {
        let applied: Option<u32> = conn.exec_first(
            "SELECT version FROM schema_migrations WHERE version = ?",
            (version,),
        )?;
        if applied.is_none() {
            conn.query_drop(sql)?;
            conn.exec_drop(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, crate::Timestamp::now()),
            )?;
        }
    }
    Ok(())
}

/// Answers whether the database takes a query right now.
pub fn ping(pool: &Pool) -> Result<(), Error> {
    with_conn(pool, |conn| Ok(conn.query_drop("DO 1")?))
}

/// Runs `f` on a pooled connection. A connection whose query found the server unreachable is
/// marked broken, so the pool drops it instead of handing it out again. Outside a
/// transaction there is nothing to retry: a conflict (a lock or `wsrep_sync_wait` timeout) is
/// [`Error::Busy`].
pub(crate) fn with_conn<T>(
    pool: &Pool,
    f: impl FnOnce(&mut Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    match on_conn(pool, f) {
        Err(e) if e.is_conflict() => Err(Error::Busy),
        Err(e) if e.is_node_not_ready() => Err(Error::Unavailable(e.to_string())),
        other => other,
    }
}

fn on_conn<T>(
    pool: &Pool,
    f: impl FnOnce(&mut Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    let started = Instant::now();
    pool.stats.waiting.fetch_add(1, Ordering::Relaxed);
    let wait = pool.inner.connection_timeout();
    let pass = pool.gate.enter(wait);
    pool.stats.waiting.fetch_sub(1, Ordering::Relaxed);
    let Some(_pass) = pass else {
        pool.stats.errors.fetch_add(1, Ordering::Relaxed);
        return Err(Error::Unavailable(format!(
            "no database connection free within {:?}",
            wait
        )));
    };
    // The gate lets in no more callers than the pool has connections: this waits while a
    // connection is opened, or an idle one is pinged (bounded by the read timeout).
    let left = wait.saturating_sub(started.elapsed());
    let conn = pool.inner.get_timeout(left.max(Duration::from_millis(1)));
    let result = conn.map_err(Error::from).and_then(|mut conn| {
        let result = f(&mut conn);
        if let Err(Error::Unavailable(_)) = &result {
            conn.broken = true;
        }
        result
    });
    if let Err(Error::Unavailable(_) | Error::Database(_)) = &result {
        pool.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// Runs `f` in one transaction and commits it. Any `?` inside rolls back (the mysql crate's
/// `Transaction` does so on drop). On deadlock, lock-wait timeout or a Galera node not ready
/// (1047) the whole transaction is retried with jittered backoff, at most 8 times and not after
/// 5 s; then the caller gets [`Error::Busy`] ([`Error::Unavailable`] if the node was still not
/// ready). Lock waits are capped at 2 s per statement.
pub(crate) fn transaction<T>(
    pool: &Pool,
    mut f: impl FnMut(&mut Transaction<'_>) -> Result<T, Error>,
) -> Result<T, Error> {
    let started = Instant::now();
    // The last failure, when it was a Galera node not ready: then the answer is Unavailable.
    let mut not_ready = None;
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 && started.elapsed() > RETRY_BUDGET {
            break;
        }
        let result = on_conn(pool, |conn| {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let value = f(&mut tx)?;
            tx.commit()?;
            Ok(value)
        });
        match result {
            Err(e) if e.is_conflict() => {
                not_ready = None;
                pool.stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff(attempt))
            }
            Err(e) if e.is_node_not_ready() => {
                not_ready = Some(e.to_string());
                pool.stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff(attempt))
            }
            other => return other,
        }
    }
    Err(not_ready.map_or(Error::Busy, Error::Unavailable))
}

/// Up to 1, 2, 4, ... ms (capped at 64 ms), uniformly jittered so that retries spread out.
fn backoff(attempt: u32) -> Duration {
    let cap_us = 1_000u64 << attempt.min(6);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_micros(random % cap_us + 1)
}

/// `items` with its last item repeated up to a power of two, so that statements over a batch
/// come in a few sizes (each size is one prepared statement per connection). Only for
/// statements where a repeated row changes nothing.
pub(crate) fn padded<T: Clone>(mut items: Vec<T>) -> Vec<T> {
    if let Some(last) = items.last().cloned() {
        items.resize(items.len().next_power_of_two(), last);
    }
    items
}

/// `n` copies of `one`, comma-separated.
pub(crate) fn placeholders(n: usize, one: &str) -> String {
    vec![one; n].join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_url_parameter_is_taken_out_and_the_rest_kept() {
        let url = "mysql://u:p@h:3306/db?socket=/s.sock&wsrep_sync_wait=1&prefer_socket=false";
        assert_eq!(
            take_param(url, "wsrep_sync_wait"),
            (
                "mysql://u:p@h:3306/db?socket=/s.sock&prefer_socket=false".to_owned(),
                Some("1".to_owned())
            )
        );
        assert_eq!(
            take_param("mysql://h/db?wsrep_sync_wait=3", "wsrep_sync_wait"),
            ("mysql://h/db".to_owned(), Some("3".to_owned()))
        );
        assert_eq!(
            take_param("mysql://h/db", "x"),
            ("mysql://h/db".to_owned(), None)
        );
        assert!(opts_from_url("mysql://h/db?wsrep_sync_wait=1").is_ok());
        assert!(opts_from_url("mysql://h/db?wsrep_sync_wait=x").is_err());
        assert!(opts_from_url("mysql://h/db?wsrep_sync_wait=16").is_err());
        assert!(opts_from_url("mysql://h/db?lock_wait_timeout=30&wsrep_sync_wait=1").is_ok());
        assert!(opts_from_url("mysql://h/db?lock_wait_timeout=0").is_err());
        assert!(opts_from_url("mysql://h/db?lock_wait_timeout=x").is_err());
    }
}
