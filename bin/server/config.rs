//! Configuration, read once from the environment. A bad value stops start-up with a message
//! that names the variable.

use coupons::auth::Secret;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub struct Config {
    /// `DATABASE_URL`: `mysql://user:pass@host:port/db` of a server to use. Unset: start the
    /// private MariaDB in `data_dir`.
    pub database_url: Option<String>,
    /// `COUPONS_DATA_DIR`: the private server's data, socket and generated JWT secret.
    pub data_dir: PathBuf,
    /// `BIND_ADDR`: where the HTTP server listens; port 0 picks a free port.
    pub bind_addr: SocketAddr,
    /// `METRICS_ADDR`: where `GET /metrics` is served to anyone, for scrapers. Unset: nowhere
    /// but `BIND_ADDR`, where it is for admins only.
    pub metrics_addr: Option<SocketAddr>,
    /// `JWT_SECRET`: at least 32 bytes. Unset with the private server: generated once and kept
    /// in `data_dir`. Unset with `DATABASE_URL`: start-up fails.
    pub jwt_secret: Option<Secret>,
    /// `TOKEN_TTL_SECS`: how long a login token stays valid.
    pub token_ttl_secs: u64,
    /// `BCRYPT_COST`: bcrypt work factor, 4 to 31.
    pub bcrypt_cost: u32,
    /// `WORKERS`: threads taking requests (bcrypt work runs on threads of its own).
    pub workers: usize,
    /// `DB_POOL_SIZE`: the most database connections the service opens.
    pub db_pool_size: u32,
    /// `DB_POOL_WAIT_MS`: how long a request waits for a free connection before a 503.
    pub db_pool_wait: Duration,
    /// `LOGIN_FAILS_PER_EMAIL_PER_MIN`: failed logins for one email before 429s (0: no limit).
    pub login_fails_per_email: u32,
    /// `LOGIN_FAILS_PER_IP_PER_MIN`: failed logins from one client address before 429s.
    pub login_fails_per_ip: u32,
    /// `REGISTRATIONS_PER_IP_PER_MIN`: registrations from one client address before 429s.
    pub registrations_per_ip: u32,
    /// `KEYED_CLAIMS_PER_USER_PER_MIN`: claims (and admin creates) with an `Idempotency-Key`
    /// by one user before 429s (0: no limit); each writes a key row, kept 24 hours.
    pub keyed_claims_per_user: u32,
    /// `TRUSTED_PROXIES`: comma-separated proxy addresses whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// `MAX_CONNECTIONS`: open client connections served at once; unset, from the fd limit.
    pub max_connections: Option<usize>,
    /// `MAX_REQUESTS_PER_CLIENT`: one client address's requests in the server at once (past
    /// it, its connections wait); loopback is not counted; 0: no cap. Default: half `WORKERS`.
    pub max_requests_per_client: usize,
    /// `ACCESS_LOG`: `on` (default) writes a line per request to stderr; `off` does not.
    pub access_log: bool,
    /// `CLAIM_BATCHING` (`on`, default, or `off`) and `CLAIM_BATCH_MAX`: the most claims
    /// combined into one transaction; 1 when off.
    pub claim_batch: usize,
    /// `CLAIM_LANES`: claim transactions in flight at most (0: one lane per coupon).
    pub claim_lanes: u64,
    /// `WEBHOOK_ALLOW_PRIVATE` (`off`, default, or `on`) and `WEBHOOK_FIRST_RETRY_MS` (1 to
    /// 5,000, default 5,000): where webhooks may go, and the wait before a first retry.
    pub webhooks: coupons::webhooks::Policy,
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let workers = number("WORKERS", 16, 1..=1024)?;
        Ok(Config {
            database_url: var("DATABASE_URL"),
            data_dir: var("COUPONS_DATA_DIR")
                .map_or_else(|| PathBuf::from("var/mysql"), PathBuf::from),
            bind_addr: parsed(
                "BIND_ADDR",
                "127.0.0.1:8000",
                "an address like 127.0.0.1:8000",
            )?,
            metrics_addr: match var("METRICS_ADDR") {
                Some(_) => Some(parsed(
                    "METRICS_ADDR",
                    "127.0.0.1:9100",
                    "an address like 127.0.0.1:9100",
                )?),
                None => None,
            },
            jwt_secret: var("JWT_SECRET")
                .map(|s| {
                    Secret::parse(&s).map_err(|_| "JWT_SECRET must be at least 32 bytes".to_owned())
                })
                .transpose()?,
            token_ttl_secs: number("TOKEN_TTL_SECS", 7200, 1..=31_536_000)?,
            bcrypt_cost: number("BCRYPT_COST", 12, 4..=31)?,
            workers,
            db_pool_size: number(
                "DB_POOL_SIZE",
                // The workers (some leading claim batches), the bcrypt threads, and as many
                // again for claims waiting on coupons locked elsewhere (threads of their own);
                // callers beyond the pool wait their turn, first come first served, for at
                // most DB_POOL_WAIT_MS. Claims queued for a batch hold no connection.
                (2 * workers + bcrypt_threads()) as u32 + 2,
                1..=1000,
            )?,
            db_pool_wait: Duration::from_millis(number("DB_POOL_WAIT_MS", 2000, 1..=60_000)?),
            login_fails_per_email: number("LOGIN_FAILS_PER_EMAIL_PER_MIN", 5, 0..=1_000_000)?,
            login_fails_per_ip: number("LOGIN_FAILS_PER_IP_PER_MIN", 60, 0..=1_000_000)?,
            registrations_per_ip: number("REGISTRATIONS_PER_IP_PER_MIN", 600, 0..=1_000_000)?,
            keyed_claims_per_user: number("KEYED_CLAIMS_PER_USER_PER_MIN", 600, 0..=1_000_000)?,
            trusted_proxies: var("TRUSTED_PROXIES")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse()
                        .map_err(|_| format!("TRUSTED_PROXIES: {p:?} is not an IP address"))
                })
                .collect::<Result<_, _>>()?,
            access_log: on_off("ACCESS_LOG")?,
            claim_batch: claim_batch()?,
            claim_lanes: claim_lanes()?,
            max_connections: match var("MAX_CONNECTIONS") {
                Some(_) => Some(number("MAX_CONNECTIONS", 10_000, 1..=1_000_000)?),
                None => None,
            },
            // Half the workers: whatever its requests cost, one client leaves the other half.
            max_requests_per_client: number(
                "MAX_REQUESTS_PER_CLIENT",
                (workers / 2).max(1),
                0..=1_000_000,
            )?,
            webhooks: coupons::webhooks::Policy {
                allow_private: match var("WEBHOOK_ALLOW_PRIVATE").as_deref() {
                    None | Some("off") => false,
                    Some("on") => true,
                    Some(other) => {
                        return Err(format!(
                            "WEBHOOK_ALLOW_PRIVATE={other:?} is not valid: expected on or off"
                        ))
                    }
                },
                first_retry: Duration::from_millis(number(
                    "WEBHOOK_FIRST_RETRY_MS",
                    5000,
                    1..=5000,
                )?),
            },
        })
    }
}

/// `CLAIM_BATCHING` and `CLAIM_BATCH_MAX` as the pool's batch limit (1: off). Read by `serve`
/// and `bench-db` alike, so both measure the same path.
pub fn claim_batch() -> Result<usize, String> {
    let max = number(
        "CLAIM_BATCH_MAX",
        coupons::claim::CLAIM_BATCH,
        2..=coupons::claim::CLAIM_BATCH_LIMIT,
    )?;
    Ok(if on_off("CLAIM_BATCHING")? { max } else { 1 })
}

/// `CLAIM_LANES` as the pool's lanes; 0 gives each coupon a lane of its own. Read by `serve`
/// and `bench-db` alike.
pub fn claim_lanes() -> Result<u64, String> {
    number(
        "CLAIM_LANES",
        coupons::claim::default_claim_lanes(),
        0..=65_536,
    )
}

/// A switch that is `on` unless set to `off`.
fn on_off(name: &str) -> Result<bool, String> {
    match var(name).as_deref() {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(format!("{name}={other:?} is not valid: expected on or off")),
    }
}

/// Threads that run bcrypt (logins and registrations): one per core.
pub fn bcrypt_threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// A variable's value; empty counts as unset.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parsed<T: FromStr>(name: &str, default: &str, expected: &str) -> Result<T, String> {
    let value = var(name).unwrap_or_else(|| default.to_owned());
    value
        .trim()
        .parse()
        .map_err(|_| format!("{name}={value:?} is not valid: expected {expected}"))
}

fn number<T>(name: &str, default: T, range: std::ops::RangeInclusive<T>) -> Result<T, String>
where
    T: FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let expected = format!("a whole number from {} to {}", range.start(), range.end());
    let n: T = parsed(name, &default.to_string(), &expected)?;
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!("{name}={n} is not valid: expected {expected}"))
    }
}
