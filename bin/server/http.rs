//! tiny_http plumbing: the listener, the worker threads, request bodies and responses.

use super::error::ApiError;
use super::routes::{self, Class};
use coupons::auth::Auth;
use coupons::db::Pool;
use coupons::CouponId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tiny_http::{Header, Request, Response, Server};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Logins and registrations waiting for a bcrypt thread; more are refused with 503.
const SLOW_QUEUE: usize = 256;
/// Claims waiting for a claim thread; past it, 503 `overloaded`.
const CLAIM_QUEUE: usize = 4096;

/// What the handlers need: the pool and the auth settings. Built once in `main`.
pub struct App {
    pub pool: Pool,
    pub auth: Auth,
    /// False until the schema is applied (a service started before its database).
    pub ready: Arc<AtomicBool>,
    /// Brute-force limits on logins and registrations.
    pub limits: super::limits::Limits,
    /// Counters for `GET /metrics`.
    pub metrics: super::metrics::Metrics,
    /// Whether to write one access-log line per request to stderr.
    pub access_log: bool,
}

/// A response about to be sent: a status, a JSON body and extra headers.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        Reply {
            status,
            body: serde_json::to_vec(value).unwrap_or_default(),
            headers: Vec::new(),
        }
    }
}

/// Raises this process's open-file limit to its hard limit (Debian's soft default is 1,024,
/// fewer than a thousand clients) and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    #[repr(C)]
    struct Rlimit {
        cur: u64,
        max: u64,
    }
    extern "C" {
        fn getrlimit(resource: i32, rlim: *mut Rlimit) -> i32;
        fn setrlimit(resource: i32, rlim: *const Rlimit) -> i32;
    }
    const RLIMIT_NOFILE: i32 = 7;
    let mut lim = Rlimit { cur: 0, max: 0 };
    // SAFETY: plain libc calls on a properly laid out `struct rlimit` (two u64 on Linux).
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let raised = Rlimit {
            cur: lim.max,
            max: lim.max,
        };
        if lim.cur < lim.max && setrlimit(RLIMIT_NOFILE, &raised) == 0 {
            lim.cur = lim.max;
        }
    }
    lim.cur
}

/// Binds with TCP_NODELAY set on the listener (accepted sockets inherit it): tiny_http never
/// sets it, and without it small responses wait on delayed ACKs.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// SIGINT and SIGTERM, caught from the start so that a signal during start-up (while the
/// private database starts) still ends in a clean stop with status 0.
#[derive(Default)]
pub struct Shutdown {
    requested: AtomicBool,
}

impl Shutdown {
    pub fn install() -> Result<Arc<Shutdown>, String> {
        let shutdown = Arc::new(Shutdown::default());
        let handler = shutdown.clone();
        ctrlc::set_handler(move || handler.requested.store(true, Ordering::SeqCst))
            .map_err(|e| format!("installing the signal handler: {e}"))?;
        Ok(shutdown)
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// Serves until SIGINT or SIGTERM, then lets in-flight requests finish and returns.
pub fn serve(
    app: App,
    listener: TcpListener,
    threads: Threads,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let server = Server::from_listener(listener, None).map_err(|e| e.to_string())?;
    let stopping = &shutdown.requested;
    let (slow_tx, slow_rx) = sync_channel::<Request>(SLOW_QUEUE);
    let (claim_tx, claim_rx) = sync_channel::<Request>(CLAIM_QUEUE);
    let (slow_rx, claim_rx) = (Mutex::new(slow_rx), Mutex::new(claim_rx));
    let order = Mutex::new(());
    let claim_threads = Backlog::default();
    let workers_waiting = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| purge_keys(&app, stopping));
        for _ in 0..threads.bcrypt {
            s.spawn(|| {
                lower_priority();
                lane_worker(&app, &slow_rx, None)
            });
        }
        for _ in 0..threads.claims {
            s.spawn(|| lane_worker(&app, &claim_rx, Some(&claim_threads)));
        }
        for _ in 0..threads.workers {
            let lanes = Lanes {
                slow: slow_tx.clone(),
                claims: claim_tx.clone(),
                order: &order,
                claim_threads: &claim_threads,
                workers_waiting: &workers_waiting,
                max_workers_waiting: threads.workers / 2,
            };
            let (app, server) = (&app, &server);
            s.spawn(move || worker(app, server, &lanes, stopping));
        }
        // Workers hold the only senders now: when they stop, the lanes' threads stop too.
        drop((slow_tx, claim_tx));
    });
    Ok(())
}

/// How many threads of each kind serve requests.
pub struct Threads {
    /// Parse every request and answer all but logins, registrations and claims.
    pub workers: usize,
    /// Run bcrypt (logins and registrations), at nice 10.
    pub bcrypt: usize,
    /// Run claims. A claim on a hot coupon mostly waits for its turn in a combined
    /// transaction; many such threads make big batches without crowding the other requests.
    pub claims: usize,
}

/// Where workers pass requests that have threads of their own.
struct Lanes<'a> {
    slow: SyncSender<Request>,
    claims: SyncSender<Request>,
    /// Held from taking a request to passing it on.
    order: &'a Mutex<()>,
    claim_threads: &'a Backlog,
    /// Workers waiting for a batch now, and at most.
    workers_waiting: &'a AtomicUsize,
    max_workers_waiting: usize,
}

/// How a lane's threads keep up: requests passed on and not yet taken, threads waiting for one.
#[derive(Default)]
struct Backlog {
    queued: AtomicUsize,
    idle: AtomicUsize,
}

impl Backlog {
    /// Whether a request passed on now would find a thread free.
    fn keeps_up(&self) -> bool {
        self.queued.load(Ordering::SeqCst) < self.idle.load(Ordering::SeqCst)
    }
}

/// Deletes expired idempotency keys once an hour, until the server stops.
fn purge_keys(app: &App, stopping: &AtomicBool) {
    let mut next = std::time::Instant::now();
    while !stopping.load(Ordering::SeqCst) {
        if std::time::Instant::now() >= next {
            if let Err(e) = coupons::idempotency::purge(&app.pool, coupons::idempotency::KEEP_FOR) {
                eprintln!("coupons: purging idempotency keys: {e}");
            }
            next += std::time::Duration::from_secs(3600);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Workers look for a stop this often. After one, they go on answering what arrives until
/// nothing has for this long, and for [`DRAIN_LIMIT`] at most; whatever is still queued then
/// gets a 503.
const POLL: Duration = Duration::from_millis(200);
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

fn worker(app: &App, server: &Server, lanes: &Lanes<'_>, stopping: &AtomicBool) {
    let mut drain_until = None;
    loop {
        let stop = stopping.load(Ordering::SeqCst);
        if stop
            && Instant::now() >= *drain_until.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT)
        {
            while let Ok(Some(rq)) = server.try_recv() {
                respond(rq, ApiError::ShuttingDown.reply("shutdown"));
            }
            return;
        }
        // Requests are taken and passed to the lanes in one order: tiny_http answers a
        // connection's pipelined requests in order, so request N+1 of a connection must never
        // sit ahead of request N in a lane's queue (N+1's thread would wait for N for ever).
        let order = lock(lanes.order);
        let next = if stop {
            server.try_recv()
        } else {
            server.recv_timeout(POLL)
        };
        let rq = match next {
            Ok(Some(rq)) => rq,
            Ok(None) if stop => return,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("coupons: accepting a request: {e}");
                continue;
            }
        };
        let found = routes::find(rq.method(), path(rq.url()));
        let class = found.as_ref().map_or(Class::Inline, |(r, _)| r.class);
        // bcrypt takes about 0.3 s of CPU: keep it off the threads that serve claims.
        let route = match found {
            Ok((_, id)) if class == Class::Claim => claim_route(app, id.coupon().ok(), lanes),
            _ => Route::Here,
        };
        let (lane, what) = if class == Class::Bcrypt {
            (&lanes.slow, "login queue")
        } else if route == Route::ClaimThread {
            lanes.claim_threads.queued.fetch_add(1, Ordering::SeqCst);
            (&lanes.claims, "claim queue")
        } else {
            drop(order);
            let waits = route == Route::HereWaiting;
            if waits {
                lanes.workers_waiting.fetch_add(1, Ordering::SeqCst);
            }
            handle(app, rq);
            if waits {
                lanes.workers_waiting.fetch_sub(1, Ordering::SeqCst);
            }
            continue;
        };
        let refused = lane.try_send(rq);
        drop(order);
        if let Err(TrySendError::Full(rq) | TrySendError::Disconnected(rq)) = refused {
            if what == "claim queue" {
                lanes.claim_threads.queued.fetch_sub(1, Ordering::SeqCst);
            }
            respond(rq, ApiError::Overloaded.reply(what))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where a request runs.
#[derive(PartialEq)]
enum Route {
    /// On its worker.
    Here,
    /// On its worker, though it waits for its lane's next batch.
    HereWaiting,
    /// On a claim thread.
    ClaimThread,
}

/// Where a claim on `coupon` runs. One that would wait for a batch goes to a claim thread, so its
/// worker stays free; one that runs at once stays on the worker (no hand-over between threads).
/// But when every claim thread is taken, a claim on a coupon with no claims waiting would wait
/// in the claim queue behind a busy coupon's backlog: it waits for its lane's next batch on its
/// worker instead, while at most half the workers do.
fn claim_route(app: &App, coupon: Option<CouponId>, lanes: &Lanes<'_>) -> Route {
    let Some(id) = coupon else {
        return Route::Here;
    };
    if coupons::claim::busy(&app.pool, id) {
        Route::ClaimThread
    } else if !coupons::claim::in_flight(&app.pool, id) {
        Route::Here
    } else if lanes.claim_threads.keeps_up()
        || lanes.workers_waiting.load(Ordering::SeqCst) >= lanes.max_workers_waiting
    {
        Route::ClaimThread
    } else {
        Route::HereWaiting
    }
}

/// Serves the requests passed to one lane until the workers stop, keeping `backlog`.
fn lane_worker(app: &App, queue: &Mutex<Receiver<Request>>, backlog: Option<&Backlog>) {
    loop {
        backlog.map(|b| b.idle.fetch_add(1, Ordering::SeqCst));
        let next = queue.lock().map(|rx| rx.recv());
        if let Some(b) = backlog {
            b.idle.fetch_sub(1, Ordering::SeqCst);
            if matches!(next, Ok(Ok(_))) {
                b.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        match next {
            Ok(Ok(rq)) => handle(app, rq),
            _ => return,
        }
    }
}

/// Makes this thread yield the CPU to the others (nice 10): a flood of logins then slows
/// logins, not claims.
fn lower_priority() {
    extern "C" {
        fn gettid() -> i32;
        fn setpriority(which: i32, who: u32, prio: i32) -> i32;
    }
    const PRIO_PROCESS: i32 = 0;
    // SAFETY: plain libc calls; on Linux a thread id names one thread for setpriority.
    unsafe {
        setpriority(PRIO_PROCESS, gettid() as u32, 10);
    }
}

/// Routes one request and sends the answer. A panic in a handler becomes a 500 and the
/// worker lives on.
pub fn handle(app: &App, mut rq: Request) {
    let started = Instant::now();
    let what = format!("{} {}", rq.method(), path(rq.url()));
    let id = request_id(&rq);
    let mut reply = guarded(&what, || routes::route(app, &mut rq));
    let secs = started.elapsed().as_secs_f64();
    let route = routes::route_name(rq.method(), rq.url());
    app.metrics.request(route, reply.status, secs);
    if app.access_log {
        // Method and path only: tokens and the seed's query-string passwords never reach a log.
        eprintln!("{id} {what} {} {:.1}ms", reply.status, secs * 1000.0);
    }
    reply.headers.push(("X-Request-Id", id));
    respond(rq, reply);
}

/// The client's `X-Request-Id` when it is a sane one (1 to 128 of `A-Za-z0-9._-`), else a new one.
fn request_id(rq: &Request) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let sent = rq.headers().iter().find(|h| h.field.equiv("X-Request-Id"));
    if let Some(h) = sent {
        let v = h.value.as_str();
        let sane = (1..=128).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if sane {
            return v.to_owned();
        }
    }
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{boot:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs a handler; its error becomes its response, and a panic a 500 (the thread goes on).
fn guarded(what: &str, handler: impl FnOnce() -> Result<Reply, ApiError>) -> Reply {
    match catch_unwind(AssertUnwindSafe(handler)) {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => e.reply(what),
        Err(_) => ApiError::Panic.reply(what),
    }
}

fn respond(rq: Request, reply: Reply) {
    // Always a Content-Length: bodies are built whole, and tiny_http would otherwise switch
    // to chunked encoding from 32 KiB.
    let mut response = Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_chunked_threshold(usize::MAX);
    let typed = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("Content-Type"));
    let default_type = (!typed).then(|| ("Content-Type", "application/json".to_owned()));
    let headers = default_type.into_iter().chain(reply.headers);
    for (name, value) in headers {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    // The client may be gone; there is no one left to tell.
    let _ = rq.respond(response);
}

/// The URL without its query string.
pub fn path(url: &str) -> &str {
    url.split_once('?').map_or(url, |(p, _)| p)
}

/// The query string's parameters, percent-decoded (the seed's clients send credentials and
/// coupon fields this way).
pub fn query(url: &str) -> Vec<(String, String)> {
    let Some((_, q)) = url.split_once('?') else {
        return Vec::new();
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok();
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match hex().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The token from `Authorization: Bearer <jwt>` or the seed's `token: <jwt>` header.
pub fn token(rq: &Request) -> Option<&str> {
    rq.headers().iter().find_map(|h| {
        let value = h.value.as_str().trim();
        if h.field.equiv("Authorization") {
            let (scheme, rest) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        } else if h.field.equiv("token") {
            Some(value)
        } else {
            None
        }
    })
}

/// The JSON body parsed as `T`, or `None` when there is no body. At most [`BODY_LIMIT`] bytes
/// are read; a larger declared length is refused before reading.
pub fn json_body<T: DeserializeOwned>(rq: &mut Request) -> Result<Option<T>, ApiError> {
    if rq.body_length().is_some_and(|n| n > BODY_LIMIT) {
        return Err(ApiError::TooLarge);
    }
    // A declared length lets the connection's thread read the body ahead (vendor/tiny_http);
    // a chunked one would be read here, on a worker, at the client's pace.
    if rq.body_length().is_none()
        && rq
            .headers()
            .iter()
            .any(|h| h.field.equiv("Transfer-Encoding"))
    {
        return Err(ApiError::LengthRequired);
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(BODY_LIMIT as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::MalformedJson(format!("could not read the body: {e}")))?;
    if body.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let is_json = rq.headers().iter().any(|h| {
        h.field.equiv("Content-Type")
            && h.value
                .as_str()
                .split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidBody(e.to_string()),
            _ => ApiError::MalformedJson(e.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_is_a_500_and_the_thread_goes_on() {
        let reply = guarded("GET /boom", || panic!("handler bug"));
        assert_eq!(reply.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["code"], "internal");
        assert!(!body.to_string().contains("handler bug"));
        // The same thread serves the next request.
        let next = guarded("GET /ok", || {
            Ok(Reply::json(200, &serde_json::json!({"ok": true})))
        });
        assert_eq!(next.status, 200);
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = query("/login?email=ada%40x.org&password=a+b%2Bc&bad=%zz&flag");
        assert_eq!(
            q,
            vec![
                ("email".into(), "ada@x.org".into()),
                ("password".into(), "a b+c".into()),
                ("bad".into(), "%zz".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert_eq!(path("/coupons/1/claim?x=1"), "/coupons/1/claim");
    }
}
