//! tiny_http plumbing: the listener, the worker threads, request bodies and responses.

use super::error::ApiError;
use super::routes::{self, Class};
use coupons::auth::Auth;
use coupons::claim::{ClaimRecord, Claimed};
use coupons::db::Pool;
use coupons::idempotency::Answer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::borrow::Cow;
use std::fmt::Write;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response, Server};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Logins and registrations waiting for a bcrypt thread; more are refused with 503.
const SLOW_QUEUE: usize = 256;

/// What the handlers need: the pool and the auth settings. Built once in `main`.
pub struct App {
    pub pool: Pool,
    /// Every claim goes through it (claim combining lives here).
    pub claims: coupons::claim::Claims,
    /// Every confirm goes through it: confirms waiting together share a transaction.
    pub confirms: coupons::life::Confirms,
    pub auth: Auth,
    /// False until the schema is applied (a service started before its database).
    pub ready: Arc<AtomicBool>,
    /// Brute-force limits on logins and registrations.
    pub limits: super::limits::Limits,
    /// Each client's share of the server (`MAX_REQUESTS_PER_CLIENT`).
    pub shares: Arc<super::limits::Shares>,
    /// Counters for `GET /metrics`.
    pub metrics: super::metrics::Metrics,
    /// Whether to write one access-log line per request to stderr.
    pub access_log: bool,
    /// Claims handed to `claims` and not answered yet.
    pub claims_pending: AtomicUsize,
    /// Where webhooks may go, and how soon they are retried.
    pub webhooks: coupons::webhooks::Policy,
    /// Set when a stop begins: `/healthz` answers 503 from then on, so that a load balancer
    /// sends new clients elsewhere while the drain runs. Shared with the signal handler.
    pub stopping: Arc<AtomicBool>,
}

/// A response about to be sent: a status, a JSON body and extra headers; or a body streamed
/// from a reader (chunked), read while it is sent.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    pub stream: Option<Box<dyn Read + Send>>,
}

impl Reply {
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        Reply::bytes(status, serde_json::to_vec(value).unwrap_or_default())
    }

    /// A body sent whole.
    pub fn bytes(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
            stream: None,
        }
    }
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
    requested: Arc<AtomicBool>,
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
///
/// Which thread does what (the README says more): tiny_http reads each connection on a thread
/// of its own and hands on one request of a connection at a time. A claim whose lane has a
/// batch in flight is read and queued there by that thread ([`first_look`]). `threads.workers`
/// workers loop on `recv()` and answer every other request themselves, but logins and
/// registrations, which go to the bcrypt threads (nice 10), so a login flood slows logins, not
/// claims. A claim whose lane was idle is left with [`coupons::claim::Claims`] by its worker,
/// which then runs the lane's batches until it is idle again. Every claim is answered by the
/// thread that runs its batch, and holds no thread while it waits.
pub fn serve(
    mut app: App,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    threads: Threads,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let server = Server::from_listener(listener, None).map_err(|e| e.to_string())?;
    let metrics = metrics
        .map(|l| Server::from_listener(l, None).map_err(|e| e.to_string()))
        .transpose()?;
    app.stopping = Arc::clone(&shutdown.requested);
    let app = Arc::new(app);
    let look = Arc::clone(&app);
    // A panic there drops the request, which tiny_http then answers 500.
    server.set_first_look(Box::new(move |mut rq| {
        take_share(&look, &mut rq);
        catch_unwind(AssertUnwindSafe(|| first_look(&look, rq))).unwrap_or(None)
    }));
    let sweeping = Arc::clone(&app);
    // Holds that ran out go back to stock within a second or so of their end.
    let _sweeper = coupons::life::Sweeper::start(app.pool.clone(), SWEEP_EVERY, move |e| {
        let ready = sweeping.ready.load(Ordering::SeqCst);
        if ready && !matches!(e, coupons::Error::Unavailable(_)) {
            eprintln!("coupons: expiring holds: {e}");
        }
    })
    .map_err(|e| e.to_string())?;
    let sequencing = Arc::clone(&app);
    // Committed events get their feed ids within ~100 ms, for webhooks and idle readers.
    let _sequencer =
        coupons::events::Sequencer::start(app.pool.clone(), SEQUENCE_EVERY, move |e| {
            let ready = sequencing.ready.load(Ordering::SeqCst);
            if ready && !matches!(e, coupons::Error::Unavailable(_)) {
                eprintln!("coupons: sequencing events: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    let delivering = Arc::clone(&app);
    // Webhook deliveries, each endpoint on a thread of its own while it has events to deliver.
    let _deliverer = coupons::webhooks::Deliverer::start(
        app.pool.clone(),
        app.webhooks,
        DELIVER_EVERY,
        move |e| {
            let ready = delivering.ready.load(Ordering::SeqCst);
            if ready && !matches!(e, coupons::Error::Unavailable(_)) {
                eprintln!("coupons: delivering webhooks: {e}");
            }
        },
    )
    .map_err(|e| e.to_string())?;
    let (slow_tx, slow_rx) = sync_channel::<Request>(SLOW_QUEUE);
    let slow_rx = Mutex::new(slow_rx);
    // One end for every worker's drain, from the first to see the stop: a worker that was
    // running a lane's batches meanwhile must not start a drain of its own later.
    let drain_until = OnceLock::new();
    std::thread::scope(|s| {
        s.spawn(|| purge_keys(&app));
        if let Some(metrics) = &metrics {
            s.spawn(|| serve_metrics(&app, metrics));
        }
        for _ in 0..threads.bcrypt {
            s.spawn(|| {
                lower_priority();
                while let Ok(rq) = lock(&slow_rx).recv() {
                    // Past the drain a login queue of about 0.25 s each is refused, not worked off.
                    match drain_until.get() {
                        Some(end) if Instant::now() >= *end => {
                            respond(rq, ApiError::ShuttingDown.reply("shutdown"))
                        }
                        _ => handle(&app, rq),
                    }
                }
            });
        }
        for _ in 0..threads.workers {
            let (app, server, slow, drain_until) = (&app, &server, slow_tx.clone(), &drain_until);
            s.spawn(move || worker(app, server, &slow, drain_until));
        }
        // Workers hold the only senders now: when they stop, the bcrypt threads stop too.
        drop(slow_tx);
    });
    // Claims waiting for a lock elsewhere run on threads of their own: let them answer too.
    // Connections are still read meanwhile; what reaches the workers' queue now is refused
    // until the queue is empty, and clients that keep sending are refused for at most POLL
    // more: they must not keep the service from stopping.
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut settled = None;
    loop {
        let now = Instant::now();
        if app.claims_pending.load(Ordering::SeqCst) == 0 {
            settled.get_or_insert(now + POLL);
        }
        if now >= deadline || settled.is_some_and(|at| now >= at) {
            return Ok(());
        }
        match server.recv_timeout(Duration::from_millis(10)) {
            Ok(Some(rq)) => respond(rq, ApiError::ShuttingDown.reply("shutdown")),
            _ if settled.is_some() => return Ok(()),
            _ => {}
        }
    }
}

/// `METRICS_ADDR`'s one thread: `GET /metrics` for anyone (a scraper has no token), and
/// nothing else.
fn serve_metrics(app: &App, server: &Server) {
    while !app.stopping.load(Ordering::SeqCst) {
        let Ok(Some(rq)) = server.recv_timeout(POLL) else {
            continue;
        };
        let reply = match (rq.method(), path(rq.url())) {
            (Method::Get | Method::Head, "/metrics") => routes::metrics_text(app),
            _ => ApiError::RouteNotFound.reply("metrics"),
        };
        respond(rq, reply);
    }
}

/// How many threads of each kind serve requests.
pub struct Threads {
    /// Take every request, and answer all but logins and registrations.
    pub workers: usize,
    /// Run bcrypt (logins and registrations), at nice 10.
    pub bcrypt: usize,
}

/// Deletes expired idempotency keys once an hour, until the server stops.
fn purge_keys(app: &App) {
    let mut next = std::time::Instant::now();
    while !app.stopping.load(Ordering::SeqCst) {
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
/// nothing has for this long, and for [`DRAIN_LIMIT`] at most, counted from the first worker
/// to see it; whatever is still queued then gets a 503.
const POLL: Duration = Duration::from_millis(200);
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// The largest claim body the connection's thread reads (a hold is about 20 bytes); a larger
/// one goes to a worker unread.
const SMALL_BODY: usize = 1024;
/// How often holds that ran out are looked for: well within the 5 s promised.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often committed events are numbered for the feed (`coupons::events::sequence`).
const SEQUENCE_EVERY: Duration = Duration::from_millis(100);
/// How often due webhook endpoints are looked for (`coupons::webhooks::Deliverer`).
const DELIVER_EVERY: Duration = Duration::from_millis(200);

fn worker(
    app: &Arc<App>,
    server: &Server,
    slow: &SyncSender<Request>,
    drain_until: &OnceLock<Instant>,
) {
    loop {
        let stop = app.stopping.load(Ordering::SeqCst);
        // What is queued then is refused after the workers stop (`serve`).
        if stop && Instant::now() >= *drain_until.get_or_init(|| Instant::now() + DRAIN_LIMIT) {
            return;
        }
        let rq = match server.recv_timeout(POLL) {
            Ok(Some(rq)) => rq,
            Ok(None) if stop => return,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("coupons: accepting a request: {e}");
                continue;
            }
        };
        match routes::find(rq.method(), path(rq.url())) {
            // bcrypt takes about 0.3 s of CPU: keep it off the threads that serve claims.
            Ok((route, _)) if route.class == Class::Bcrypt => {
                if let Err(TrySendError::Full(rq) | TrySendError::Disconnected(rq)) =
                    slow.try_send(rq)
                {
                    respond(rq, ApiError::Overloaded.reply("login queue"));
                }
            }
            Ok((route, id)) if route.class == Class::Claim => claim(app, rq, route.name, id),
            Ok((route, id)) if route.class == Class::Grouped => confirm(app, rq, route.name, id),
            _ => handle(app, rq),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes this thread yield the CPU to the others (nice 10): a flood of logins then slows
/// logins, not claims.
fn lower_priority() {
    // SAFETY: plain libc calls; on Linux a thread id names one thread for setpriority.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// Routes one request on this thread and sends the answer. A panic in a handler becomes a 500
/// and the thread lives on.
pub fn handle(app: &App, mut rq: Request) {
    let started = Instant::now();
    let what = what(&rq);
    let reply = guarded(&what, || routes::route(app, &mut rq));
    let route = routes::route_name(rq.method(), rq.url());
    finish(app, rq, reply, route, &what, started);
}

/// A claim: read and checked here, then left with the claims, which answer it when its batch
/// commits, on whichever thread runs the batch (this one, if it finds the lane idle).
fn claim(app: &Arc<App>, rq: Request, route: &'static str, id: routes::Params) {
    let read = |rq: &mut Request| routes::claim_ticket(app, rq, id);
    let Some((ticket, answer)) = ClaimAnswer::read(app, rq, route, read) else {
        return;
    };
    app.claims.submit(&ticket.ask, ticket.key.as_ref(), answer);
}

/// A confirm, as a claim: read and checked here, answered when its batch commits, on whichever
/// thread runs the batch (this one, if it finds the lane idle).
fn confirm(app: &Arc<App>, rq: Request, route: &'static str, id: routes::Params) {
    let read = |rq: &mut Request| routes::confirm_ticket(app, rq, id);
    let Some(((owner, claim), answer)) = ClaimAnswer::read(app, rq, route, read) else {
        return;
    };
    // May lead: always taken.
    let _ = app.confirms.confirm_with(owner, claim, true, answer);
}

/// On a connection's thread, before the request is queued for a worker: a claim whose lane
/// has a batch in flight is read and queued in the lane here, so that no worker is woken just
/// to pass it on. Anything else, and a claim that would run at once, goes to the workers.
/// After a stop everything goes to the workers, whose drain has an end: a lane fed from here
/// would keep its thread running as long as clients keep sending.
fn first_look(app: &Arc<App>, rq: Request) -> Option<Request> {
    // Nothing here upgrades a connection: refused before any worker sees it (tiny_http then
    // closes the connection, as it does after any upgrade request).
    if rq.headers().iter().any(|h| h.field.equiv("Upgrade")) {
        let started = Instant::now();
        let what = what(&rq);
        let route = routes::route_name(rq.method(), rq.url());
        let reply = ApiError::UpgradeRefused.reply(&what);
        finish(app, rq, reply, route, &what, started);
        return None;
    }
    if app.stopping.load(Ordering::SeqCst) {
        return Some(rq);
    }
    let Ok((route, id)) = routes::find(rq.method(), path(rq.url())) else {
        return Some(rq);
    };
    // A confirm whose lane has a batch in flight is queued there, as a claim is below; one
    // that would run at once goes to a worker, which may run the lane's batches for a while
    // (this thread would keep its own client waiting meanwhile).
    if route.class == Class::Grouped {
        let mut rq = rq;
        let checked = catch_unwind(AssertUnwindSafe(|| {
            routes::confirm_ticket(app, &mut rq, id)
        }));
        let Ok(Ok((owner, claim))) = checked else {
            return Some(rq);
        };
        let answer = ClaimAnswer::new(app, rq, route.name);
        return match app.confirms.confirm_with(owner, claim, false, answer) {
            Ok(()) => None,
            Err(answer) => answer.give_back(),
        };
    }
    // A claim by code finds its coupon by a read: a worker's work. So is a large body.
    let small = rq.body_length().is_none_or(|n| n <= SMALL_BODY);
    if route.class != Class::Claim || !small || !matches!(id, routes::Params::Coupon(_)) {
        return Some(rq);
    }
    // Its body (a hold's), kept to be given back with the request should a worker read it.
    let mut rq = rq;
    let mut body = Vec::new();
    if rq.body_length().is_some_and(|n| n > 0) {
        let read = rq
            .as_reader()
            .take(SMALL_BODY as u64)
            .read_to_end(&mut body);
        if read.is_err() {
            return Some(rq);
        }
        rq.set_body(body.clone());
    }
    // An error is answered by a worker, as any request's; only a good claim is queued here.
    let checked = catch_unwind(AssertUnwindSafe(|| routes::claim_ticket(app, &mut rq, id)));
    let Ok(Ok(ticket)) = checked else {
        return Some(restored(rq, body));
    };
    let answer = ClaimAnswer::new(app, rq, route.name);
    match app.claims.queue(&ticket.ask, ticket.key.as_ref(), answer) {
        Ok(()) => None,
        Err(answer) => {
            // A worker reads it again, and counts it then.
            ticket.put_back(app);
            Some(restored(answer.give_back()?, body))
        }
    }
}

/// On a connection's thread, first: waits while the request's client has its share of the
/// server (`MAX_REQUESTS_PER_CLIENT`), reading nothing more from this connection meanwhile;
/// the place taken is given back when the request is answered.
fn take_share(app: &App, rq: &mut Request) {
    if let Some(slot) = app.shares.admit(routes::client_ip(app, rq)) {
        rq.hold(Box::new(slot));
    }
}

/// `rq` with the body the connection's thread read from it given back (none to give back for
/// a claim without a body, the common case: no allocation then).
fn restored(mut rq: Request, body: Vec<u8>) -> Request {
    if !body.is_empty() {
        rq.set_body(body);
    }
    rq
}

/// A claim request (or a confirm) waiting for its answer, and where that answer goes.
struct ClaimAnswer {
    app: Arc<App>,
    /// `None` once answered or given back.
    rq: Option<Request>,
    route: &'static str,
    what: String,
    started: Instant,
}

impl ClaimAnswer {
    /// Counted among the claims pending until it is dropped (answered, given back, or lost).
    fn new(app: &Arc<App>, rq: Request, route: &'static str) -> ClaimAnswer {
        app.claims_pending.fetch_add(1, Ordering::SeqCst);
        ClaimAnswer {
            app: Arc::clone(app),
            what: what(&rq),
            rq: Some(rq),
            route,
            started: Instant::now(),
        }
    }

    /// What `rq` asks for, as `read` reads it, and where its answer goes; `None` when it was
    /// answered at once (a bad token, a bad key, a handler panic).
    fn read<T>(
        app: &Arc<App>,
        mut rq: Request,
        route: &'static str,
        read: impl FnOnce(&mut Request) -> Result<T, ApiError>,
    ) -> Option<(T, ClaimAnswer)> {
        let checked = catch_unwind(AssertUnwindSafe(|| read(&mut rq)));
        let answer = ClaimAnswer::new(app, rq, route);
        let error = match checked {
            Ok(Ok(ticket)) => return Some((ticket, answer)),
            Ok(Err(e)) => e.reply(&answer.what),
            Err(_) => ApiError::Panic.reply(&answer.what),
        };
        answer.answer(error);
        None
    }

    fn give_back(mut self) -> Option<Request> {
        self.rq.take()
    }

    fn answer(mut self, reply: Reply) {
        if let Some(rq) = self.rq.take() {
            finish(&self.app, rq, reply, self.route, &self.what, self.started);
        }
    }
}

impl Drop for ClaimAnswer {
    fn drop(&mut self) {
        self.app.claims_pending.fetch_sub(1, Ordering::SeqCst);
    }
}

impl coupons::claim::Reply for ClaimAnswer {
    fn send(self, answer: Answer<Claimed>) {
        let reply = guarded(&self.what, || routes::claim_reply(&self.app, answer));
        self.deliver(reply);
    }
}

impl coupons::claim::Reply<Result<ClaimRecord, coupons::Error>> for ClaimAnswer {
    fn send(self, answer: Result<ClaimRecord, coupons::Error>) {
        let reply = guarded(&self.what, || routes::confirm_reply(answer));
        self.deliver(reply);
    }
}

impl ClaimAnswer {
    /// From the thread running a lane's batches. A client that reads none of its answers
    /// must not make it wait: its answer goes out on a thread of its own. Should no thread be
    /// had, the request is dropped with the closure, and tiny_http answers it 500 from here
    /// after all.
    fn deliver(self, reply: Reply) {
        if self.rq.as_ref().is_none_or(writable_now) {
            return self.answer(reply);
        }
        let _ = std::thread::Builder::new().spawn(move || self.answer(reply));
    }
}

/// Whether `rq`'s socket has room for an answer now (a client that reads nothing fills it).
fn writable_now(rq: &Request) -> bool {
    let Some(fd) = rq.raw_fd() else {
        return true;
    };
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the socket stays open while `rq` is unanswered.
    let ready = unsafe { libc::poll(&mut p, 1, 0) };
    ready == 1 && p.revents & libc::POLLOUT != 0
}

/// Method and path, for logs: never the query string (the seed's clients send passwords there),
/// and escaped ([`loggable`]): both are the client's bytes.
fn what(rq: &Request) -> String {
    format!(
        "{} {}",
        loggable(rq.method().as_str()),
        loggable(path(rq.url()))
    )
}

/// `s` as a log line may show it: printable ASCII as it is, a backslash doubled, and anything
/// else (ESC, CR, LF and the other controls; any non-ASCII, which a request line never needs)
/// escaped as `\x1b` or `\u{202e}`, so that a client can neither forge a log line nor drive
/// the terminal that shows it.
pub fn loggable(s: &str) -> Cow<'_, str> {
    if s.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        let _ = match c {
            '\\' => out.write_str("\\\\"),
            ' '..='~' => out.write_char(c),
            c if c.is_ascii() => write!(out, "\\x{:02x}", u32::from(c)),
            c => write!(out, "\\u{{{:x}}}", u32::from(c)),
        };
    }
    Cow::Owned(out)
}

/// Counts and logs a request's answer (`route` is its metrics label), and sends it.
fn finish(
    app: &App,
    rq: Request,
    mut reply: Reply,
    route: &'static str,
    what: &str,
    started: Instant,
) {
    let secs = started.elapsed().as_secs_f64();
    app.metrics.request(route, reply.status, secs);
    let id = request_id(&rq);
    if app.access_log {
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

fn respond(rq: Request, mut reply: Reply) {
    if let Some(stream) = reply.stream.take() {
        // No length: chunked, read from the stream as it is sent.
        let response = Response::new(reply.status.into(), Vec::new(), stream, None, None);
        return send(rq, response, reply.headers);
    }
    // Always a Content-Length: bodies are built whole, and tiny_http would otherwise switch
    // to chunked encoding from 32 KiB.
    let response = Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_chunked_threshold(usize::MAX);
    send(rq, response, reply.headers)
}

fn send<R: Read>(rq: Request, mut response: Response<R>, headers: Vec<(&'static str, String)>) {
    let typed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("Content-Type"));
    let default_type = (!typed).then(|| ("Content-Type", "application/json".to_owned()));
    let headers = default_type.into_iter().chain(headers);
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
    json_body_up_to(rq, BODY_LIMIT)
}

/// [`json_body`] with a limit of its own, for a route that takes more (an import of codes).
pub fn json_body_up_to<T: DeserializeOwned>(
    rq: &mut Request,
    limit: usize,
) -> Result<Option<T>, ApiError> {
    if rq.body_length().is_some_and(|n| n > limit) {
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
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::MalformedJson(format!("could not read the body: {e}")))?;
    if body.len() > limit {
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
    let parsed = serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidBody(e.to_string()),
        _ => ApiError::MalformedJson(e.to_string()),
    })?;
    // Every body is an object: serde would take a struct from an array of its fields too.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidBody(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(Some(parsed))
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
    fn log_lines_show_only_printable_ascii() {
        for (raw, logged) in [
            ("/coupons/1/claim", "/coupons/1/claim"),
            ("/x\x1b[2K\rforged\nline", "/x\\x1b[2K\\x0dforged\\x0aline"),
            ("/\u{0}\u{7f}\t", "/\\x00\\x7f\\x09"),
            ("/a\\x1b", "/a\\\\x1b"),
            ("/\u{202e}é", "/\\u{202e}\\u{e9}"),
        ] {
            assert_eq!(loggable(raw), logged, "{raw:?}");
        }
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
