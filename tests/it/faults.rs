//! Faults injected for real, in the middle of a parallel claim load: the database stopped and
//! restarted, the service killed with SIGKILL, a deadlock. Afterwards every claim in the database
//! is one that some answer reported (at first, or on the idempotent retry), and
//! remaining + claims == stock.

use crate::support::{try_request, Service, TestDb, JSON, SECRET};
use coupons::embedded::EmbeddedServer;
use mysql::prelude::Queryable;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

/// One claim request: its key, its token, and its answer (status and claim id), if any.
struct Attempt {
    key: String,
    token: usize,
    status: Option<u16>,
    claim: Option<u64>,
}

fn claim(addr: &str, coupon: u64, token: &str, key: &str) -> (Option<u16>, Option<u64>) {
    let path = format!("/coupons/{coupon}/claim");
    match try_request(
        addr,
        "POST",
        &path,
        &[("token", token), ("Idempotency-Key", key)],
        None,
    ) {
        Some(r) => (Some(r.status), r.body["claim"]["id"].as_u64()),
        None => (None, None),
    }
}

/// Claims from one thread per token, each request with a fresh key, until `stop`.
fn load(addr: &RwLock<String>, coupon: u64, tokens: &[String], stop: &AtomicBool) -> Vec<Attempt> {
    std::thread::scope(|s| {
        let handles: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(t, token)| {
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let key = format!("t{t}-n{n}");
                        let current = addr.read().unwrap().clone();
                        let (status, claim) = claim(&current, coupon, token, &key);
                        if status.is_none() {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        mine.push(Attempt {
                            key,
                            token: t,
                            status,
                            claim,
                        });
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Retries every attempt that got no answer or a 5xx with its own key until it gets a real
/// one, then checks that the claims in the database are exactly those the answers report.
#[track_caller]
fn settle(addr: &str, db: &TestDbLike, coupon: u64, tokens: &[String], attempts: &mut [Attempt]) {
    for a in attempts.iter_mut() {
        let mut tries = 0;
        while a.status.is_none_or(|s| s >= 500) {
            tries += 1;
            assert!(
                tries < 100,
                "attempt {} never settled: {:?}",
                a.key,
                a.status
            );
            let (status, claim) = claim(addr, coupon, &tokens[a.token], &a.key);
            (a.status, a.claim) = (status, claim);
            if a.status.is_none_or(|s| s >= 500) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert_eq!(a.status, Some(201), "attempt {}", a.key);
    }
    let answered: BTreeSet<u64> = attempts.iter().filter_map(|a| a.claim).collect();
    assert_eq!(
        answered.len(),
        attempts.len(),
        "two answers reported one claim"
    );
    let mut conn = db.conn();
    let rows: Vec<u64> = conn
        .exec(
            "SELECT id FROM claims WHERE coupon_id = ? ORDER BY id",
            (coupon,),
        )
        .unwrap();
    let in_db: BTreeSet<u64> = rows.into_iter().collect();
    assert_eq!(in_db, answered, "claims in the database != claims answered");
    let (available, total): (i64, i64) = conn
        .exec_first(
            "SELECT available_count, total_count FROM coupons WHERE id = ?",
            (coupon,),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        available + in_db.len() as i64,
        total,
        "remaining + claims != stock"
    );
}

/// A database to check, whether a TestDb or the private server of a fault test.
struct TestDbLike {
    url: String,
}

impl TestDbLike {
    fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(mysql::Opts::from_url(&self.url).unwrap()).unwrap()
    }
}

fn setup(svc: &Service, url: &str) -> (u64, Vec<String>) {
    let admin = svc.register("admin@example.com");
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap();
    conn.query_drop("UPDATE users SET role = 'ADMIN' WHERE email = 'admin@example.com'")
        .unwrap();
    let coupon = new_coupon(svc, &admin, r#"{"code":"FAULT","available_count":1000000}"#);
    let tokens = (0..8)
        .map(|i| svc.register(&format!("u{i}@example.com")))
        .collect();
    (coupon, tokens)
}

/// The id of a coupon the admin with token `admin` creates from `body`.
fn new_coupon(svc: &Service, admin: &str, body: &str) -> u64 {
    let auth = format!("Bearer {admin}");
    let r = svc.call(
        "POST",
        "/admin/coupons",
        &[JSON, ("Authorization", &auth)],
        Some(body),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_u64().unwrap()
}

#[test]
fn the_database_stopped_and_restarted_under_load_loses_and_doubles_nothing() {
    let dir = std::env::temp_dir().join(format!("coupons-it-restart-db-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = EmbeddedServer::start(&dir).unwrap();
    let url = server.url("coupons");
    let svc = Service::spawn(&[
        ("DATABASE_URL", &url),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        ("DB_POOL_WAIT_MS", "300"),
        // Each of the 8 users claims with a fresh key as fast as answers come, and retries
        // every 503 with its key: 300 to 500 each in these seconds on 2 cores in a debug
        // build, so the default 600 a minute would refuse some on a faster machine.
        ("KEYED_CLAIMS_PER_USER_PER_MIN", "0"),
    ]);
    let (coupon, tokens) = setup(&svc, &url);
    let addr = RwLock::new(svc.addr.clone());
    let stop = AtomicBool::new(false);
    let mut attempts = std::thread::scope(|s| {
        let worker = s.spawn(|| load(&addr, coupon, &tokens, &stop));
        std::thread::sleep(Duration::from_millis(800));
        server.stop().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let server = EmbeddedServer::start(&dir).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        let attempts = worker.join().unwrap();
        (attempts, server)
    });
    let failed = attempts.0.iter().filter(|a| a.status != Some(201)).count();
    assert!(failed > 0, "the outage was not seen by any request");
    assert!(attempts.0.iter().filter(|a| a.status == Some(201)).count() > 10);
    settle(
        &svc.addr,
        &TestDbLike { url: url.clone() },
        coupon,
        &tokens,
        &mut attempts.0,
    );
    drop(svc);
    drop(attempts.1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_service_killed_under_load_loses_and_doubles_nothing() {
    let db = TestDb::new();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        // Each of the 8 users claims with a fresh key as fast as answers come: 300 to 500 each
        // in these seconds on 2 cores in a debug build, so the default 600 a minute would
        // refuse some on a faster machine.
        ("KEYED_CLAIMS_PER_USER_PER_MIN", "0"),
    ];
    let svc = Service::spawn(&env);
    let (coupon, tokens) = setup(&svc, &db.url);
    let addr = RwLock::new(svc.addr.clone());
    let stop = AtomicBool::new(false);
    let (mut attempts, svc) = std::thread::scope(|s| {
        let worker = s.spawn(|| load(&addr, coupon, &tokens, &stop));
        std::thread::sleep(Duration::from_millis(800));
        let mut svc = svc;
        std::process::Command::new("kill")
            .args(["-KILL", &svc.child.id().to_string()])
            .status()
            .unwrap();
        svc.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let svc = Service::spawn(&env);
        *addr.write().unwrap() = svc.addr.clone();
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::SeqCst);
        (worker.join().unwrap(), svc)
    });
    assert!(
        attempts.iter().any(|a| a.status.is_none()),
        "the kill was not seen by any request"
    );
    settle(
        &svc.addr,
        &TestDbLike {
            url: db.url.clone(),
        },
        coupon,
        &tokens,
        &mut attempts,
    );
}

#[test]
fn a_deadlock_with_a_claim_ends_in_a_retried_success() {
    use coupons::auth::{Auth, Secret};
    use coupons::{coupon, CouponCode, Email, Password, Status, Stock};
    let db = TestDb::new();
    let auth = Auth::new(&Secret::parse(SECRET).unwrap(), 60, 4).unwrap();
    let user = auth
        .register(
            &db.pool,
            &Email::parse("d@example.com").unwrap(),
            &Password::parse("password123").unwrap(),
        )
        .unwrap();
    let c = coupon::create(
        &db.pool,
        coupons::UserId(0),
        &coupon::NewCoupon {
            code: CouponCode::parse("DEAD").unwrap(),
            available_count: Stock::parse(5).unwrap(),
            status: Status::Active,
            rules: coupon::Rules::default(),
        },
    )
    .unwrap();
    // The other transaction takes the user's row, the claim takes the coupon's row and then
    // needs the user's row (its foreign key check), and the other then asks for the coupon's.
    let mut other = db.conn();
    other.query_drop("START TRANSACTION").unwrap();
    // Heavier than the claim, so that InnoDB picks the claim as the deadlock's victim.
    for _ in 0..200 {
        other
            .query_drop("INSERT INTO audit_log (actor_id, action, detail, created_at) VALUES (0, 'test', '{}', NOW())")
            .unwrap();
    }
    other
        .exec_drop("UPDATE users SET role = role WHERE id = ?", (user.id.0,))
        .unwrap();
    let outcome = std::thread::scope(|s| {
        let claimer = s.spawn(|| db.claims.claim(user.id, c.id));
        std::thread::sleep(Duration::from_millis(300));
        let r = other.exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (c.id.0,));
        let code = match &r {
            Err(mysql::Error::MySqlError(e)) => Some(e.code),
            _ => None,
        };
        other.query_drop("ROLLBACK").unwrap();
        (claimer.join().unwrap(), code)
    });
    let (result, other_error) = outcome;
    let claimed = result.expect("the claim ends in success after its retry");
    // The claim was the victim and was retried; the other transaction went through.
    assert_eq!(other_error, None);
    assert!(
        db.pool.stats().retries >= 1,
        "no retry happened: {:?}",
        db.pool.stats()
    );
    assert_eq!(db.stock(c.id.0), (4, 1, 5));
    assert_eq!(db.scalar("SELECT COUNT(*) FROM claims"), 1);
    assert_eq!(claimed.available_count, 4);
}

/// p99 of a normal client's claims, in ms, while `during` runs.
fn normal_client_p99(svc: &Service, coupon: u64, token: &str, secs: f64) -> (f64, usize) {
    let path = format!("/coupons/{coupon}/claim");
    let started = std::time::Instant::now();
    let mut lat = Vec::new();
    while started.elapsed().as_secs_f64() < secs {
        let t = std::time::Instant::now();
        let r = svc.call("POST", &path, &[("token", token)], None);
        assert_eq!(
            r.status, 201,
            "the normal client was not served: {}",
            r.body
        );
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    (lat[(lat.len() * 99 / 100).min(lat.len() - 1)], lat.len())
}

#[test]
fn slow_and_idle_clients_do_not_starve_a_normal_client() {
    use std::io::Write;
    use std::net::TcpStream;
    let db = TestDb::new();
    let svc = Service::start(&db);
    let (coupon, tokens) = setup(&svc, &db.url);
    let (quiet, n) = normal_client_p99(&svc, coupon, &tokens[0], 1.0);
    eprintln!("slow clients: quiet: p99 {quiet:.2} ms over {n} claims");

    // 1,000 idle keep-alive connections.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&svc.addr).unwrap())
        .collect();
    let (p99, n) = normal_client_p99(&svc, coupon, &tokens[0], 2.0);
    eprintln!("slow clients: 1000 idle connections: p99 {p99:.2} ms over {n} claims");
    drop(idle);

    // Slowloris: 100 clients sending a header byte every 100 ms, and 100 sending a body slowly.
    let stop = AtomicBool::new(false);
    let (p99, n) = std::thread::scope(|s| {
        for i in 0..200 {
            let (addr, stop) = (&svc.addr, &stop);
            s.spawn(move || {
                let Ok(mut c) = TcpStream::connect(addr) else { return };
                let head = if i % 2 == 0 {
                    "GET /coupons HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_owned()
                } else {
                    "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{".to_owned()
                };
                let _ = c.write_all(head.as_bytes());
                while !stop.load(Ordering::SeqCst) {
                    if c.write_all(b"a").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let result = normal_client_p99(&svc, coupon, &tokens[0], 2.0);
        stop.store(true, Ordering::SeqCst);
        result
    });
    eprintln!("slow clients: 100 slowloris + 100 slow bodies: p99 {p99:.2} ms over {n} claims");

    // A request head that takes longer than 10 s is cut off (408), not held for ever.
    let mut c = TcpStream::connect(&svc.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = std::time::Instant::now();
    let _ = c.write_all(b"GET /coupons HTTP/1.1\r\n");
    let mut answer = Vec::new();
    loop {
        use std::io::Read;
        if c.write_all(b"X-Drip: 1\r\n").is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        c.set_nonblocking(true).unwrap();
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
        c.set_nonblocking(false).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the slow head was never cut off"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let cut = started.elapsed();
    assert!(cut >= Duration::from_secs(9), "cut off too early: {cut:?}");
    assert!(
        String::from_utf8_lossy(&answer).is_empty()
            || String::from_utf8_lossy(&answer).contains(" 408 ")
    );
    assert_eq!(
        db.stock(coupon).1 as usize,
        db.scalar("SELECT COUNT(*) FROM claims") as usize
    );
}

/// A connection with a small receive window, for a client that never reads.
fn never_reading(addr: &str) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    socket.into()
}

#[test]
fn clients_that_pipeline_and_never_read_hold_up_nobody() {
    use std::io::Write;
    let db = TestDb::new();
    let svc = Service::start(&db);
    let (_, tokens) = setup(&svc, &db.url);
    let admin = svc.login("admin@example.com");
    // Long answers fill a socket sooner: a long code and name, and a long request id echoed.
    let (code, name, id) = ("L".repeat(64), "n".repeat(200), "r".repeat(128));
    let body = format!(r#"{{"code":"{code}","name":"{name}","available_count":1000000}}"#);
    let coupon = new_coupon(&svc, &admin, &body);
    // One client pipelines 20,000 claims on the coupon the normal client claims too (so its
    // answers come from the same lane's batches), another 300 requests for the largest
    // document; neither reads a byte of the answers.
    let claims: String = (0..20_000)
        .map(|_| {
            format!(
                "POST /coupons/{coupon}/claim HTTP/1.1\r\nHost: x\r\ntoken: {}\r\nX-Request-Id: {id}\r\nContent-Length: 0\r\n\r\n",
                tokens[1]
            )
        })
        .collect();
    let documents = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    let done = AtomicBool::new(false);
    // Set however the scope's body ends: a failed assertion there must fail the test, not
    // leave the clients below looping while the scope waits for them.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let (worst, n) = std::thread::scope(|s| {
        let _stop = Stop(&done);
        for flood in [claims, documents] {
            let (mut c, done) = (never_reading(&svc.addr), &done);
            s.spawn(move || {
                // Stops once the server stops reading this connection; that is the point.
                let mut rest = flood.as_bytes();
                while !rest.is_empty() && !done.load(Ordering::SeqCst) {
                    match c.write(rest) {
                        Ok(n) => rest = &rest[n..],
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        // Other clients keep the lane busy, so that a batch is always queued behind the one
        // being answered.
        for t in &tokens[2..8] {
            let (svc, done) = (&svc, &done);
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let path = format!("/coupons/{coupon}/claim");
                    let r = svc.call("POST", &path, &[("token", t)], None);
                    assert_eq!(
                        r.status, 201,
                        "a client of the lane was not served: {}",
                        r.body
                    );
                }
            });
        }
        // Meanwhile a normal client claims, and asks for /healthz, until the flood's answers
        // have filled its socket (a few MiB: its claims stop being answered) and 2 s more.
        let flooded = || {
            db.scalar(
                "SELECT COUNT(*) FROM claims c JOIN users u ON u.id = c.user_id
                 WHERE u.email = 'u1@example.com'",
            )
        };
        let started = std::time::Instant::now();
        let (mut worst, mut n) = (Duration::ZERO, 0);
        let (mut last, mut since) = (0, started);
        let mut full: Option<std::time::Instant> = None;
        while full.is_none_or(|at| at.elapsed() < Duration::from_secs(2)) {
            // About 4,000 answers fill it: 35 s for a debug build alone on a slow machine.
            assert!(
                started.elapsed() < Duration::from_secs(150),
                "the flood never filled"
            );
            let t = std::time::Instant::now();
            let r = svc.call(
                "POST",
                &format!("/coupons/{coupon}/claim"),
                &[("token", &tokens[0])],
                None,
            );
            assert_eq!(r.status, 201, "{}", r.body);
            let h = svc.call("GET", "/healthz", &[], None);
            assert_eq!(h.status, 200, "{}", h.body);
            worst = worst.max(t.elapsed());
            n += 1;
            let now = flooded();
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            } else if full.is_none() && now > 0 && since.elapsed() > Duration::from_millis(1500) {
                full = Some(std::time::Instant::now());
            }
        }
        eprintln!("never-reading clients: flood stopped after {last} claims");
        (worst, n)
    });
    eprintln!("never-reading clients: {n} rounds, worst {worst:?}");
    // A write that waits holds up a lane or a worker until the 10 s write timeout.
    assert!(worst < Duration::from_secs(2), "worst round {worst:?}");
    db.stock(coupon);
}

#[test]
fn over_the_connection_cap_new_connections_are_closed_and_served_again_after() {
    use std::io::Read;
    use std::net::TcpStream;
    let db = TestDb::new();
    let svc = Service::spawn(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        ("MAX_CONNECTIONS", "20"),
    ]);
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&svc.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(&svc.addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let started = std::time::Instant::now();
    let result = extra.read(&mut buf);
    let closed = match &result {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(
        closed && started.elapsed() < Duration::from_secs(2),
        "a connection over the cap was kept: {result:?}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
}

#[test]
fn an_unread_body_closes_the_connection_and_is_never_a_request() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let db = TestDb::new();
    let svc = Service::start(&db);
    let (coupon, tokens) = setup(&svc, &db.url);
    // A body the service does not read (over 64 KiB), carrying requests of its own.
    let inner = format!(
        "POST /coupons/{coupon}/claim HTTP/1.1\r\nHost: x\r\ntoken: {}\r\nContent-Length: 0\r\n\r\n",
        tokens[0]
    );
    let mut body = inner.repeat(2);
    body.push_str(&" ".repeat(70 * 1024));
    let head = format!(
        "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut c = TcpStream::connect(&svc.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let _ = c.write_all(body.as_bytes());
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM claims"),
        0,
        "the body was run as a request"
    );

    // Sixteen clients declaring bodies they never send hold no worker: the service answers.
    let slow: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(&svc.addr).unwrap();
            let _ = s.write_all(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
    let body = r#"{"email":"late@example.com","password":"password123"}"#;
    assert_eq!(
        svc.call("POST", "/register", &[JSON], Some(body)).status,
        201
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stalled for {:?}",
        started.elapsed()
    );
    drop(slow);

    // A chunked body is refused (411), and the connection ends with it.
    let chunked = "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let r = crate::support::send(&svc.addr, chunked.as_bytes(), b"");
    assert_eq!(r.status, 411);
}

#[test]
fn continue_and_upgrade_bodies_are_read_before_any_worker_sees_them() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let db = TestDb::new();
    let svc = Service::start(&db);
    let login = r#"{"email":"slow@example.com","password":"password123"}"#;
    svc.call("POST", "/register", &[JSON], Some(login));
    // A well-behaved `Expect: 100-continue`: the 100, then the body, then the answer.
    let mut c = TcpStream::connect(&svc.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        login.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    // Reads until `want` has arrived, and returns all read so far.
    let mut seen = String::new();
    let mut read_until = |c: &mut TcpStream, want: &str| {
        let mut buf = [0u8; 1024];
        while !seen.contains(want) {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed before {want:?}: {seen}");
            seen += &String::from_utf8_lossy(&buf[..n]);
        }
        seen.clone()
    };
    let first = read_until(&mut c, "\r\n\r\n");
    assert!(first.starts_with("HTTP/1.1 100 "), "{first}");
    c.write_all(login.as_bytes()).unwrap();
    let all = read_until(&mut c, "\"token\"");
    assert!(all.contains("HTTP/1.1 200 "), "{all}");

    // Logins that trickle their bodies after a 100-continue, or with an upgrade, hold no
    // worker and no bcrypt thread: other logins are answered meanwhile.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for i in 0..8 {
            let (addr, stop) = (&svc.addr, &stop);
            s.spawn(move || {
                let Ok(mut c) = TcpStream::connect(addr) else { return };
                let extra = if i % 2 == 0 {
                    "Expect: 100-continue\r\n"
                } else {
                    "Connection: Upgrade\r\nUpgrade: websocket\r\n"
                };
                let head = format!("POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: 5000\r\n\r\n{{");
                let _ = c.write_all(head.as_bytes());
                while !stop.load(Ordering::SeqCst) {
                    if c.write_all(b" ").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        let started = std::time::Instant::now();
        for _ in 0..4 {
            let r = svc.call("POST", "/login", &[JSON], Some(login));
            assert_eq!(r.status, 200, "{}", r.body);
        }
        assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
        stop.store(true, Ordering::SeqCst);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "logins stalled for {:?}",
            started.elapsed()
        );
    });

    // An upgrade is refused, with its body read, and nothing upgrades.
    let head =
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let r = crate::support::send(&svc.addr, head.as_bytes(), b"");
    assert_eq!(r.status, 400);
    assert_eq!(r.body["code"], "upgrade_not_supported");
}

/// `path`'s request from the client `client` (behind the trusted proxy of the test: loopback).
fn from_client(
    svc: &Service,
    method: &str,
    path: &str,
    client: &str,
    token: Option<&str>,
) -> crate::support::Resp {
    let mut headers = vec![("X-Forwarded-For", client)];
    headers.extend(token.map(|t| ("token", t)));
    svc.call(method, path, &headers, None)
}

#[test]
fn one_client_with_many_connections_holds_only_its_share_of_the_server() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let db = TestDb::new();
    // Without batching a claim runs on a worker, and waits there for its coupon's lock: an
    // expensive request. Two clients behind a trusted proxy (on loopback, as the test is).
    let svc = Service::start_with(
        &db,
        &[
            ("CLAIM_BATCHING", "off"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
            ("MAX_REQUESTS_PER_CLIENT", "4"),
        ],
    );
    let (locked, tokens) = setup(&svc, &db.url);
    let admin = svc.login("admin@example.com");
    let quiet = new_coupon(&svc, &admin, r#"{"code":"QUIET","available_count":100}"#);
    let mut holder = db.conn();
    holder.query_drop("START TRANSACTION").unwrap();
    holder
        .exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (locked,))
        .unwrap();
    // One client: 40 connections, each claiming the locked coupon (more than the 16 workers).
    let flood: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut c = TcpStream::connect(&svc.addr).unwrap();
            let head = format!(
                "POST /coupons/{locked}/claim HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\ntoken: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                tokens[0]
            );
            c.write_all(head.as_bytes()).unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Another client is answered at once: its /healthz and its claim on another coupon.
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let r = from_client(&svc, "GET", "/healthz", "198.51.100.2", None);
        assert_eq!(r.status, 200, "{}", r.body);
        let path = format!("/coupons/{quiet}/claim");
        let r = from_client(&svc, "POST", &path, "198.51.100.2", Some(&tokens[1]));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let waited = started.elapsed();
    holder.query_drop("ROLLBACK").unwrap();
    // Workers held by the flood wait for the lock for seconds.
    assert!(
        waited < Duration::from_secs(1),
        "another client waited {waited:?}"
    );
    // The flood's claims are all answered once the lock is gone, four at a time.
    for mut c in flood {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
    }
    assert_eq!(db.stock(locked).1, 40);
}

/// The service's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_connection_pipelining_without_end_keeps_memory_bounded() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let db = TestDb::new();
    let svc = Service::start(&db);
    for _ in 0..50 {
        assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
    }
    let pid = svc.child.id();
    let before = rss_kib(pid);
    // For 3 s, one connection pipelines as fast as it can and reads its answers, another
    // pipelines and never reads (the red team's 500,000 requests took 420 MB).
    let batch = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(10_000);
    let done = AtomicBool::new(false);
    let (peak, sent) = std::thread::scope(|s| {
        let reading = TcpStream::connect(&svc.addr).unwrap();
        let mut answers = reading.try_clone().unwrap();
        let done = &done;
        s.spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            answers
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            while !done.load(Ordering::SeqCst) {
                let _ = answers.read(&mut buf);
            }
        });
        let senders: Vec<_> = [reading, never_reading(&svc.addr)]
            .into_iter()
            .map(|mut c| {
                let batch = &batch;
                s.spawn(move || {
                    c.set_write_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    let mut sent = 0usize;
                    while !done.load(Ordering::SeqCst) {
                        match c.write(batch.as_bytes()) {
                            Ok(n) => sent += n,
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                    sent
                })
            })
            .collect();
        let started = std::time::Instant::now();
        let mut peak = before;
        while started.elapsed() < Duration::from_secs(3) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::SeqCst);
        let sent: Vec<usize> = senders.into_iter().map(|h| h.join().unwrap()).collect();
        (peak, sent)
    });
    eprintln!("pipelining: sent {sent:?} bytes; VmRSS {before} KiB, peak {peak} KiB");
    assert!(
        peak < before + 32 * 1024,
        "VmRSS grew from {before} to {peak} KiB"
    );
    assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
}
