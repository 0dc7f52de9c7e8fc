//! Fixtures: the shared database server, a fresh database per test, the real binary on a free
//! port, and a small HTTP/1.1 client over `TcpStream`.

use coupons::auth::{Auth, Secret};
use coupons::claim::Claims;
use coupons::db::{self, Pool};
use coupons::embedded::EmbeddedServer;
use mysql::prelude::Queryable;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// The database server for this test binary: a URL template with `{db}` for the database.
struct Server {
    url: String,
    _embedded: Option<EmbeddedServer>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("TEST_DATABASE_URL") {
        Ok(url) => Server {
            url: with_database(&url, "{db}"),
            _embedded: None,
        },
        Err(_) => {
            // Never dropped: when this process exits the watchdog stops the server and removes
            // the directory.
            let dir = std::env::temp_dir().join(format!("coupons-test-{}", std::process::id()));
            let embedded = EmbeddedServer::start_ephemeral(&dir).unwrap_or_else(|e| {
                panic!("the tests need MariaDB (apt-get install -y mariadb-server) or TEST_DATABASE_URL: {e}")
            });
            Server {
                url: embedded.url("{db}"),
                _embedded: Some(embedded),
            }
        }
    })
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("TEST_DATABASE_URL is mysql://...");
    let (before_query, query) = rest
        .split_once('?')
        .map_or((rest, None), |(a, b)| (a, Some(b)));
    let authority = before_query.split('/').next().unwrap_or(before_query);
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// A fresh database with the schema applied, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: Pool,
    /// Claims over `pool`, combined as the service combines them.
    pub claims: Claims,
}

impl TestDb {
    pub fn new() -> TestDb {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // Tests run side by side in this one process, and some open a thousand connections.
        static RAISED: std::sync::Once = std::sync::Once::new();
        RAISED.call_once(|| {
            coupons::fds::raise_fd_limit();
        });
        let name = format!(
            "coupons_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let url = server().url.replace("{db}", &name);
        let opts = db::opts_from_url(&url).unwrap();
        db::create_database(&opts).expect("creating a test database");
        let pool = db::pool(opts, 16, db::CHECKOUT_TIMEOUT).unwrap();
        db::migrate(&pool).expect("applying the schema");
        let claims = Claims::new(pool.clone());
        TestDb {
            name,
            url,
            pool,
            claims,
        }
    }

    /// A direct connection, for checking what is really in the database.
    pub fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(mysql::Opts::from_url(&self.url).unwrap()).unwrap()
    }

    /// One number from the database.
    pub fn scalar(&self, sql: &str) -> i64 {
        self.conn().query_first(sql).unwrap().unwrap()
    }

    /// Checks `available_count + claims not voided == total_count` for every coupon, and
    /// returns (available, live claims, total) of the one asked for.
    #[track_caller]
    pub fn stock(&self, coupon: u64) -> (i64, i64, i64) {
        let broken = unbalanced(&mut self.conn());
        assert!(
            broken.is_empty(),
            "remaining + claims != stock for {broken:?}"
        );
        let miscounted = miscounted(&mut self.conn());
        assert!(
            miscounted.is_empty(),
            "kept counts by status != the claims' for {miscounted:?}"
        );
        self.conn()
            .exec_first(
                "SELECT co.available_count, (SELECT COUNT(*) FROM claims WHERE coupon_id = co.id AND status IN ('held', 'claimed', 'redeemed')), co.total_count
                 FROM coupons co WHERE co.id = ?",
                (coupon,),
            )
            .unwrap()
            .expect("no such coupon")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&self.url).unwrap()) {
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

/// How many migrations `sql/` holds.
pub fn migrations() -> i64 {
    std::fs::read_dir("sql")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count() as i64
}

/// Cheap hashing for tests.
pub fn auth() -> Auth {
    Auth::new(&Secret::parse(SECRET).unwrap(), 3600, 4).unwrap()
}

/// The real binary, serving HTTP on a free port. Stopped with SIGTERM when dropped.
pub struct Service {
    pub addr: String,
    pub child: Child,
}

impl Service {
    /// Serves `db` with the test secret and cheap hashing.
    pub fn start(db: &TestDb) -> Service {
        Service::start_with(db, &[])
    }

    /// [`Service::start`] with `extra` variables besides.
    pub fn start_with(db: &TestDb, extra: &[(&str, &str)]) -> Service {
        let mut env = vec![
            ("DATABASE_URL", db.url.as_str()),
            ("JWT_SECRET", SECRET),
            ("BCRYPT_COST", "4"),
            ("WORKERS", "16"),
        ];
        env.extend_from_slice(extra);
        Service::spawn(&env)
    }

    /// Runs `coupons` with `env` on port 0 and waits for the address it prints.
    pub fn spawn(env: &[(&str, &str)]) -> Service {
        let mut child = coupons_command(env)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env(
                "ACCESS_LOG",
                env.iter()
                    .find(|(k, _)| *k == "ACCESS_LOG")
                    .map_or("off", |(_, v)| *v),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning coupons");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("coupons exited before printing its address")
                .unwrap();
            if let Some(addr) = line.strip_prefix("coupons: listening on http://") {
                break addr.to_owned();
            }
        };
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Service { addr, child }
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        request(&self.addr, method, path, headers, body)
    }

    /// Sends SIGTERM and goes on: the service drains, and exits by itself.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// SIGTERM; a service that has not exited 30 s later gets SIGKILL, so that a wedged
    /// service fails its test instead of hanging it.
    fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }

    pub fn register(&self, email: &str) -> String {
        let body = format!(r#"{{"email":"{email}","password":"password123"}}"#);
        let r = self.call("POST", "/register", &[JSON], Some(&body));
        assert_eq!(r.status, 201, "{}", r.body);
        self.login(email)
    }

    pub fn login(&self, email: &str) -> String {
        let body = format!(r#"{{"email":"{email}","password":"password123"}}"#);
        let r = self.call("POST", "/login", &[JSON], Some(&body));
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Every environment variable `bin/server/config.rs` reads, in its order. None of them is inherited by
/// a `coupons` the tests start (`embedded.rs` checks this list against config.rs's source).
pub const SERVICE_VARS: &[&str] = &[
    "DATABASE_URL",
    "COUPONS_DATA_DIR",
    "BIND_ADDR",
    "METRICS_ADDR",
    "JWT_SECRET",
    "TOKEN_TTL_SECS",
    "BCRYPT_COST",
    "WORKERS",
    "DB_POOL_SIZE",
    "DB_POOL_WAIT_MS",
    "LOGIN_FAILS_PER_EMAIL_PER_MIN",
    "LOGIN_FAILS_PER_IP_PER_MIN",
    "REGISTRATIONS_PER_IP_PER_MIN",
    "KEYED_CLAIMS_PER_USER_PER_MIN",
    "TRUSTED_PROXIES",
    "MAX_CONNECTIONS",
    "MAX_REQUESTS_PER_CLIENT",
    "ACCESS_LOG",
    "CLAIM_BATCHING",
    "CLAIM_BATCH_MAX",
    "CLAIM_LANES",
    "WEBHOOK_ALLOW_PRIVATE",
    "WEBHOOK_FIRST_RETRY_MS",
];

/// The `coupons` binary with `env` and none of the service's variables inherited.
pub fn coupons_command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coupons"));
    for var in SERVICE_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Coupons where `available_count + claims held, claimed or redeemed != total_count`, as (id,
/// available, live claims, total).
pub fn unbalanced(conn: &mut impl Queryable) -> Vec<(u64, i64, i64, i64)> {
    conn.query(
        "SELECT co.id, co.available_count, CAST(COALESCE(SUM(cl.status IN ('held', 'claimed', 'redeemed')), 0) AS SIGNED), co.total_count
         FROM coupons co LEFT JOIN claims cl ON cl.coupon_id = co.id
         GROUP BY co.id
         HAVING co.available_count + COALESCE(SUM(cl.status IN ('held', 'claimed', 'redeemed')), 0) <> co.total_count",
    )
    .unwrap()
}

/// Coupons whose counts by status kept in `claim_counts` disagree with their claims, as
/// (coupon, counted from the claims, kept): held, redeemed, voided, released, expired.
pub fn miscounted(conn: &mut impl Queryable) -> Vec<(u64, [i64; 5], [i64; 5])> {
    // One statement, so one snapshot: a test may look while sweepers or claims still commit,
    // and two reads could see the claims and the counts at different moments.
    let rows: Vec<(u8, u64, i64, i64, i64, i64, i64)> = conn
        .query(
            "SELECT 0, coupon_id, CAST(SUM(status = 'held') AS SIGNED),
                 CAST(SUM(status = 'redeemed') AS SIGNED), CAST(SUM(status = 'voided') AS SIGNED),
                 CAST(SUM(status = 'released') AS SIGNED), CAST(SUM(status = 'expired') AS SIGNED)
             FROM claims GROUP BY coupon_id
             UNION ALL
             SELECT 1, coupon_id, CAST(SUM(held) AS SIGNED), CAST(SUM(redeemed) AS SIGNED),
                 CAST(SUM(voided) AS SIGNED), CAST(SUM(released) AS SIGNED),
                 CAST(SUM(expired) AS SIGNED)
             FROM claim_counts GROUP BY coupon_id",
        )
        .unwrap();
    // Per coupon: [counted from the claims, kept].
    let mut by_coupon: HashMap<u64, [[i64; 5]; 2]> = HashMap::new();
    for (kept, c, h, r, v, rl, e) in rows {
        by_coupon.entry(c).or_default()[kept as usize] = [h, r, v, rl, e];
    }
    let mut wrong: Vec<(u64, [i64; 5], [i64; 5])> = by_coupon
        .into_iter()
        .filter(|(_, [counted, kept])| counted != kept)
        .map(|(c, [counted, kept])| (c, counted, kept))
        .collect();
    wrong.sort_unstable();
    wrong
}

/// Per-user counter rows that disagree with the live claims (held, claimed or redeemed), as
/// (user, counted, claims).
pub fn counter_mismatches(conn: &mut impl Queryable) -> Vec<(u64, i64, i64)> {
    conn.query(
        "SELECT u.user_id, u.claimed, (SELECT COUNT(*) FROM claims c WHERE c.user_id = u.user_id AND c.coupon_id = u.coupon_id AND c.status IN ('held', 'claimed', 'redeemed')) n
         FROM user_coupon_claims u HAVING u.claimed <> n",
    )
    .unwrap()
}

pub const JSON: (&str, &str) = ("Content-Type", "application/json");

/// An HTTP answer: status, headers (lower-case names) and the body as JSON.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

/// One HTTP/1.1 request on a new connection.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|| panic!("no answer from {addr}"))
}

/// Like [`request`], but `None` when there is no answer.
pub fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<Resp> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    raw.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    try_send(addr, raw.as_bytes(), body.as_bytes())
}

/// Sends raw bytes and parses the answer.
pub fn send(addr: &str, head: &[u8], body: &[u8]) -> Resp {
    try_send(addr, head, body).unwrap_or_else(|| panic!("no answer from {addr}"))
}

/// Like [`send`], but `None` when the connection fails or closes without an answer.
pub fn try_send(addr: &str, head: &[u8], body: &[u8]) -> Option<Resp> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    stream.write_all(head).ok()?;
    // The server may answer (413) and close before taking the whole body.
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    parse(&answer)
}

fn parse(answer: &[u8]) -> Option<Resp> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    Some(Resp {
        status,
        headers,
        body,
    })
}
