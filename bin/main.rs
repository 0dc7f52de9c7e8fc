//! The `coupons` binary: reads the configuration, opens the database (a private MariaDB or
//! `DATABASE_URL`), applies the schema, then serves HTTP or runs an admin command.

mod bench;
mod server;

use bench::{benchdb, loadtest, suite};
use coupons::auth;
use coupons::db::{self, Pool};
use coupons::embedded::EmbeddedServer;
use coupons::{Email, Error, Role};
use server::config::Config;
use server::http;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const USAGE: &str = "\
coupons: a concurrency-safe coupon service

Usage:
  coupons [serve]               serve HTTP (the default)
  coupons migrate               apply the schema in sql/ and exit
  coupons admin promote EMAIL   make a user an admin
  coupons admin demote EMAIL    make an admin a plain user
  coupons loadtest [OPTIONS]    load a running service (--url) or one it starts (--embedded)
  coupons bench-db [OPTIONS]    claims/s of the library alone, no HTTP (the yardstick)
  coupons bench-suite [OPTIONS] every figure of BENCHMARKS.md: tables and charts
  coupons COMMAND --help        that command's usage
  coupons --version             the version
  coupons --help                this text

Environment (see README.md): DATABASE_URL, COUPONS_DATA_DIR, BIND_ADDR, JWT_SECRET,
TOKEN_TTL_SECS, BCRYPT_COST, WORKERS, DB_POOL_SIZE, DB_POOL_WAIT_MS,
LOGIN_FAILS_PER_EMAIL_PER_MIN, LOGIN_FAILS_PER_IP_PER_MIN, REGISTRATIONS_PER_IP_PER_MIN,
TRUSTED_PROXIES, MAX_CONNECTIONS, MAX_REQUESTS_PER_CLIENT, ACCESS_LOG.
With DATABASE_URL unset, a private MariaDB is started in COUPONS_DATA_DIR (default var/mysql).
";

/// Each command's usage, for `coupons COMMAND --help`.
fn usage_of(command: &str) -> Option<String> {
    Some(match command {
        "serve" => {
            "coupons [serve]: serve HTTP on BIND_ADDR (default 0.0.0.0:8000) until SIGINT or \
SIGTERM.\nThe environment sets everything (coupons --help lists it; README.md, \"Configuration\")."
                .into()
        }
        "migrate" => "coupons migrate: apply the schema in sql/ to the database and exit.".into(),
        "admin" => "coupons admin promote EMAIL: make a registered user an admin\n\
coupons admin demote EMAIL:  make an admin a plain user\n\
The database is the running service's: DATABASE_URL, or the private one in COUPONS_DATA_DIR."
            .into(),
        "loadtest" => loadtest::USAGE.into(),
        "bench-db" => benchdb::USAGE.into(),
        "bench-suite" => suite::USAGE.into(),
        _ => return None,
    })
}

enum Command {
    Serve,
    Migrate,
    SetRole(String, Role),
    Loadtest,
    BenchDb,
    Suite,
    Help,
    /// `COMMAND --help` (or `-h`), anywhere among its arguments.
    HelpOn(String),
    Version,
}

impl Command {
    fn parse(args: &[String]) -> Option<Command> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let [command, rest @ ..] = args.as_slice() {
            if rest.iter().any(|a| matches!(*a, "--help" | "-h")) {
                usage_of(command)?;
                return Some(Command::HelpOn(command.to_string()));
            }
        }
        Some(match args.as_slice() {
            [] | ["serve"] => Command::Serve,
            ["migrate"] => Command::Migrate,
            ["admin", "promote", email] => Command::SetRole(email.to_string(), Role::Admin),
            ["admin", "demote", email] => Command::SetRole(email.to_string(), Role::User),
            ["--help" | "-h" | "help"] => Command::Help,
            ["--version" | "-V"] => Command::Version,
            ["loadtest", ..] => Command::Loadtest,
            ["bench-db", ..] => Command::BenchDb,
            ["bench-suite", ..] => Command::Suite,
            _ => return None,
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = Command::parse(&args) else {
        eprint!("coupons: unknown command {:?}\n\n{USAGE}", args.join(" "));
        return ExitCode::from(2);
    };
    let tool = match command {
        Command::Help => {
            print!(
                "{USAGE}\n{}\n{}\n{}\n",
                loadtest::USAGE,
                benchdb::USAGE,
                suite::USAGE
            );
            return ExitCode::SUCCESS;
        }
        Command::HelpOn(command) => {
            println!("{}", usage_of(&command).unwrap_or_default());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("coupons {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Loadtest => Some(loadtest::run(&args[1..])),
        Command::BenchDb => Some(benchdb::run(&args[1..])),
        Command::Suite => Some(suite::run(&args[1..])),
        _ => None,
    };
    if let Some(result) = tool {
        return match result {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(msg) => {
                eprintln!("coupons: {msg}");
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("coupons: {msg}");
            return ExitCode::from(2);
        }
    };
    match run(command, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("coupons: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The database in use. Fields drop in order: connections close before the private server stops.
struct Database {
    pool: Pool,
    embedded: Option<EmbeddedServer>,
    /// Whether the schema is applied; until then the service answers 503.
    ready: Arc<AtomicBool>,
}

/// Opens the database and applies the schema. When `serving` on `DATABASE_URL` and the server
/// does not answer, it returns at once and keeps trying in the background (`ready` says when).
fn open_database(config: &Config, pool_size: u32, serving: bool) -> Result<Database, String> {
    let (url, embedded) = match &config.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let server = EmbeddedServer::start(&config.data_dir)
                .map_err(|e| format!("COUPONS_DATA_DIR={}: {e}", config.data_dir.display()))?;
            (server.url("coupons"), Some(server))
        }
    };
    let opts = db::opts_from_url(&url).map_err(|e| format!("DATABASE_URL: {e}"))?;
    // A user without CREATE rights on an existing database is fine: migrate says if it is not.
    if let Err(e) = db::create_database(&opts) {
        if embedded.is_some() {
            return Err(e.to_string());
        }
    }
    let pool = db::pool(opts.clone(), pool_size, config.db_pool_wait).map_err(|e| e.to_string())?;
    let ready = Arc::new(AtomicBool::new(false));
    match db::migrate(&pool) {
        Ok(()) => ready.store(true, Ordering::SeqCst),
        // The service may start before its database: it answers 503 until the schema is in.
        Err(Error::Unavailable(why)) if serving && embedded.is_none() => {
            eprintln!("coupons: database unavailable ({why}); serving 503 until it is back");
            let (pool, ready) = (pool.clone(), ready.clone());
            std::thread::spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let _ = db::create_database(&opts);
                if db::migrate(&pool).is_ok() {
                    eprintln!("coupons: database is back; schema applied");
                    ready.store(true, Ordering::SeqCst);
                    return;
                }
            });
        }
        Err(e) => return Err(e.to_string()),
    }
    Ok(Database {
        pool,
        embedded,
        ready,
    })
}

fn run(command: Command, config: Config) -> Result<(), String> {
    let (pool_size, shutdown) = match command {
        Command::Serve => (config.db_pool_size, Some(http::Shutdown::install()?)),
        _ => (2, None),
    };
    let database = open_database(&config, pool_size, shutdown.is_some())?;
    match (command, shutdown) {
        (Command::Serve, Some(shutdown)) => {
            if shutdown.requested() {
                println!("coupons: stopped before serving");
                return Ok(());
            }
            serve(&config, &database, &shutdown)
        }
        (Command::Migrate, _) => {
            println!("coupons: the schema is up to date");
            Ok(())
        }
        (Command::SetRole(email, role), _) => {
            let email = Email::parse(&email).map_err(|e| e.to_string())?;
            let user = auth::set_role(&database.pool, &email, role).map_err(|e| match e {
                Error::UserNotFound => format!("no user is registered as {}", email.as_str()),
                e => e.to_string(),
            })?;
            println!("coupons: {} is now {}", user.email, role.as_str());
            Ok(())
        }
        _ => Ok(()),
    }
}

fn serve(config: &Config, database: &Database, shutdown: &http::Shutdown) -> Result<(), String> {
    let private_db = database.embedded.as_ref();
    let app = server::app(
        config,
        database.pool.clone(),
        database.ready.clone(),
        private_db.is_some(),
    )?;
    server::cap_connections(config);
    let listener =
        http::bind(config.bind_addr).map_err(|e| format!("BIND_ADDR {}: {e}", config.bind_addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("coupons: listening on http://{addr}");
    let metrics = match config.metrics_addr {
        Some(at) => {
            let l = http::bind(at).map_err(|e| format!("METRICS_ADDR {at}: {e}"))?;
            let at = l.local_addr().map_err(|e| e.to_string())?;
            println!("coupons: metrics on http://{at}/metrics");
            Some(l)
        }
        None => None,
    };
    server::print_database(config, private_db);
    http::serve(app, listener, metrics, server::threads(config), shutdown)?;
    println!("coupons: stopped");
    Ok(())
}
