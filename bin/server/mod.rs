//! The HTTP server: the configuration, tiny_http plumbing and threads (`http`), the route table
//! and its handlers (`routes`), the one error-to-HTTP mapping (`error`), brute-force limits,
//! metrics and the OpenAPI document. No SQL: handlers call the library.

pub mod config;
mod error;
pub mod http;
mod limits;
mod metrics;
mod openapi;
mod pages;
mod routes;

use config::Config;
use coupons::auth::{Auth, Secret};
use coupons::claim::Claims;
use coupons::db::Pool;
use coupons::embedded::EmbeddedServer;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What the handlers share, from the configuration. The JWT secret is `JWT_SECRET`, or with
/// the private database (`private_db`) one generated once and kept in its data directory.
pub fn app(
    config: &Config,
    pool: Pool,
    ready: Arc<AtomicBool>,
    private_db: bool,
) -> Result<http::App, String> {
    let secret = match (&config.jwt_secret, private_db) {
        (Some(s), _) => s.clone(),
        (None, true) => Secret::load_or_create(&config.data_dir.join("jwt-secret"))
            .map_err(|e| e.to_string())?,
        (None, false) => {
            return Err("JWT_SECRET must be set (at least 32 bytes) when DATABASE_URL is".into())
        }
    };
    let auth =
        Auth::new(&secret, config.token_ttl_secs, config.bcrypt_cost).map_err(|e| e.to_string())?;
    // A busy lane keeps a worker running its batches: at most half the workers may.
    let lanes = match config.claim_lanes {
        0 => 0,
        n => n.min((config.workers as u64 / 2).max(1)),
    };
    Ok(http::App {
        claims: Claims::new(pool.clone())
            .with_lanes(lanes)
            .with_batching(config.claim_batch),
        // Confirm lanes too, but at most a quarter: three quarters of the workers at most
        // run lanes, the rest answer everything else.
        confirms: coupons::life::Confirms::with_lanes(
            pool.clone(),
            coupons::claim::default_claim_lanes().min((config.workers as u64 / 4).max(1)),
        ),
        pool,
        auth,
        ready,
        limits: limits::Limits {
            login_fails_per_email: limits::Limit::new(config.login_fails_per_email),
            login_fails_per_ip: limits::Limit::new(config.login_fails_per_ip),
            registrations_per_ip: limits::Limit::new(config.registrations_per_ip),
            keyed_per_user: limits::Limit::new(config.keyed_claims_per_user),
            trusted_proxies: config.trusted_proxies.clone(),
        },
        shares: limits::Shares::new(config.max_requests_per_client),
        metrics: metrics::Metrics::default(),
        access_log: config.access_log,
        claims_pending: Default::default(),
        webhooks: config.webhooks,
        stopping: Default::default(),
    })
}

/// Caps the open client connections: `MAX_CONNECTIONS`, or what the descriptor limit (raised
/// to its hard limit first) leaves. Each connection holds a thread and a descriptor.
pub fn cap_connections(config: &Config) {
    let fds = coupons::fds::raise_fd_limit();
    // Room for the database connections and files; then two descriptors a connection:
    // tiny_http clones each socket into a read and a write half.
    let room = fds.saturating_sub(u64::from(config.db_pool_size) + 256) / 2;
    let cap = config
        .max_connections
        .unwrap_or(room.clamp(64, 10_000) as usize);
    tiny_http::set_max_connections(cap);
}

/// How many threads of each kind serve requests.
pub fn threads(config: &Config) -> http::Threads {
    http::Threads {
        workers: config.workers,
        bcrypt: config::bcrypt_threads(),
    }
}

/// Says which database is in use and how to make an admin.
pub fn print_database(config: &Config, private_db: Option<&EmbeddedServer>) {
    match private_db {
        Some(server) => println!(
            "coupons: database: private MariaDB in {} (socket {})\n\
             coupons: to make an admin, register, then run `coupons admin promote EMAIL` \
             (with cargo: `cargo run --release -- admin promote EMAIL`) from this directory",
            config.data_dir.display(),
            server.socket().display()
        ),
        None => println!(
            "coupons: database: DATABASE_URL\n\
             coupons: to make an admin, register, then run `coupons admin promote EMAIL` \
             with the same DATABASE_URL"
        ),
    }
}
