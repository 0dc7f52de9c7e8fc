//! A private MariaDB (or MySQL) server for one directory, started from the system's server
//! binary. It listens only on a Unix socket inside that directory (no TCP port), so it
//! collides with nothing else on the machine. The directory holds `data/` (the server's data),
//! `tmp/` (its temporary files), `mysql.sock`, `server.err` (its log) and `server.pid`.
//!
//! The server runs under a tiny `sh` watchdog whose standard input is a pipe from this process:
//! when this process stops, however it stops (even `kill -9`), the pipe closes and the watchdog
//! shuts the server down cleanly with SIGTERM. A second process for the same directory (say
//! `coupons admin promote` beside a running `coupons serve`) finds the socket answering and
//! attaches to the running server instead of starting another.

use crate::Error;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the server given as "$@", stops it when standard input closes, and removes the
/// directory in $1 (if not empty) once the server has exited.
const WATCHDOG: &str = r#"
remove=$1; shift
exec 3<&0
"$@" <&- 3<&- &
pid=$!
{
  read -r _ <&3
  kill -TERM "$pid" 2>/dev/null
  # A server told to stop while still starting can hang: give it 30 s, then kill it.
  i=0
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$pid" 2>/dev/null
} &
wait "$pid"
status=$?
if [ -n "$remove" ]; then rm -rf -- "$remove"; fi
exit $status
"#;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A private database server, or a handle on one another process of ours started.
pub struct EmbeddedServer {
    socket: PathBuf,
    /// The watchdog, when this process started the server; dropping its stdin stops the server.
    child: Option<Child>,
}

#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    MariaDb,
    MySql,
}

impl EmbeddedServer {
    /// Starts the server for `dir` (creating and initialising the directory on first use), or
    /// attaches to the one already running there. Data persists across starts.
    pub fn start(dir: &Path) -> Result<EmbeddedServer, Error> {
        EmbeddedServer::launch(dir, false)
    }

    /// Like [`EmbeddedServer::start`], for throwaway data: the directory is removed once the
    /// server has stopped (tests, load tests).
    pub fn start_ephemeral(dir: &Path) -> Result<EmbeddedServer, Error> {
        EmbeddedServer::launch(dir, true)
    }

    /// The server's Unix socket, for the `mariadb --socket=...` client.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A connection URL for `database` on this server, as user root over the socket.
    pub fn url(&self, database: &str) -> String {
        format!(
            "mysql://root@localhost/{database}?socket={}",
            self.socket.display()
        )
    }

    /// Whether this process started the server (and will stop it).
    pub fn owned(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server if this process started it, and waits until it has exited.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn launch(dir: &Path, ephemeral: bool) -> Result<EmbeddedServer, Error> {
        let launch =
            |what: &str, e: std::io::Error| Error::Launch(format!("{what} {}: {e}", dir.display()));
        create_private_dir(dir).map_err(|e| launch("creating", e))?;
        let dir = dir.canonicalize().map_err(|e| launch("resolving", e))?;
        // Root on the socket needs no password: only this user may reach the directory.
        check_private(&dir)?;
        let socket = dir.join("mysql.sock");
        if socket.as_os_str().len() > 100 {
            return Err(Error::Launch(format!(
                "{} is too long a path for a Unix socket; choose a shorter COUPONS_DATA_DIR",
                socket.display()
            )));
        }
        if answers(&socket) {
            return Ok(EmbeddedServer {
                socket,
                child: None,
            });
        }
        let (server, flavor) = find_server()?;
        let (data, tmp) = (dir.join("data"), dir.join("tmp"));
        // A server of its own for temporary files: a starting server deletes every `#sql*`
        // file in its tmpdir, which broke other servers' initialisation in a shared /tmp.
        fs::create_dir_all(&tmp).map_err(|e| launch("creating", e))?;
        if !data.is_dir() {
            initialize_into(&server, flavor, &dir)?;
        }
        let log = dir.join("server.err");
        let mut args = vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", data.display()),
            format!("--tmpdir={}", tmp.display()),
            format!("--socket={}", socket.display()),
            "--skip-networking".to_owned(),
            format!("--pid-file={}", dir.join("server.pid").display()),
            format!("--log-error={}", log.display()),
            "--max-connections=1000".to_owned(),
        ];
        if flavor == Flavor::MySql {
            args.push("--loose-mysqlx=OFF".to_owned());
        }
        args.extend(root_user_arg());
        let remove = if ephemeral {
            dir.display().to_string()
        } else {
            String::new()
        };
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("coupons-db")
            .arg(remove)
            .arg(&server)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C in the terminal reaches us, and we stop it in order.
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Launch(format!("starting {}: {e}", server.display())))?;
        let mut me = EmbeddedServer {
            socket,
            child: Some(child),
        };
        me.wait_ready(&log)?;
        Ok(me)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), Error> {
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            if answers(&self.socket) {
                return Ok(());
            }
            let exited = !matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)));
            if exited {
                self.child = None;
                return Err(Error::Launch(format!(
                    "the database server stopped while starting; its log {} ends with:\n{}",
                    log.display(),
                    tail(log)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Launch(format!(
            "the database server did not answer on {} within {}s; see {}",
            self.socket.display(),
            READY_TIMEOUT.as_secs(),
            log.display()
        )))
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        drop(child.stdin.take());
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(Error::Launch(format!("waiting for the server: {e}"))),
            }
        }
        Err(Error::Launch(format!(
            "the database server did not stop within {}s",
            STOP_TIMEOUT.as_secs()
        )))
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Creates `dir` with mode 0700 unless it exists (its parents as usual).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Succeeds when `path` (the private database's directory, or its `jwt-secret`) belongs to
/// this process's effective user and is closed to group and others. Whoever else owns it or
/// may open it could plant a `jwt-secret` (and sign any token), or reach the database's
/// socket, where root needs no password. Nothing is repaired: the error names the path and
/// says what to do.
pub fn check_private(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path)
        .map_err(|e| Error::Launch(format!("checking {}: {e}", path.display())))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::Launch(format!(
            "{} belongs to uid {}, not to this service's user (uid {me}): refusing to trust it; \
             remove it or give it to this user",
            path.display(),
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        let private = if meta.is_dir() { "700" } else { "600" };
        return Err(Error::Launch(format!(
            "{} is open to group or others (mode {mode:04o}): refusing to trust it; \
             `chmod {private}` it",
            path.display()
        )));
    }
    Ok(())
}

/// Whether a server answers on the socket.
fn answers(socket: &Path) -> bool {
    if !socket.exists() {
        return false;
    }
    // Bounded: a server that listens but never finishes starting must not hang us.
    let opts = mysql::OptsBuilder::new()
        .socket(Some(socket.display().to_string()))
        .user(Some("root"))
        .read_timeout(Some(Duration::from_secs(2)))
        .write_timeout(Some(Duration::from_secs(2)));
    mysql::Conn::new(opts).is_ok()
}

fn root_user_arg() -> Option<String> {
    // The server refuses to run as root unless told to; a data dir of our own is fine for it.
    let is_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    is_root.then(|| "--user=root".to_owned())
}

fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in [
        "/usr/sbin",
        "/usr/local/sbin",
        "/usr/local/mysql/bin",
        "/usr/bin",
    ] {
        dirs.push(PathBuf::from(extra));
    }
    dirs
}

fn find(name: &str) -> Option<PathBuf> {
    search_path()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_server() -> Result<(PathBuf, Flavor), Error> {
    if let Some(p) = find("mariadbd") {
        return Ok((p, Flavor::MariaDb));
    }
    if let Some(p) = find("mysqld") {
        let version = Command::new(&p).arg("--version").output();
        let is_mariadb =
            version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("MariaDB"));
        return Ok((
            p,
            if is_mariadb {
                Flavor::MariaDb
            } else {
                Flavor::MySql
            },
        ));
    }
    Err(Error::Launch(
        "no database server found: neither `mariadbd` nor `mysqld` is installed.\n\
         Install MariaDB (Debian/Ubuntu: `sudo apt-get install -y mariadb-server`), or point the \
         service at a server you already run with DATABASE_URL=mysql://user:pass@host:3306/coupons"
            .to_owned(),
    ))
}

/// Initialises `dir/data` in a staging directory and renames it into place, so an interrupted
/// or failed initialisation never leaves a data directory that looks ready.
fn initialize_into(server: &Path, flavor: Flavor, dir: &Path) -> Result<(), Error> {
    let staging = dir.join(format!(".data-init-{}", std::process::id()));
    let io = |e: std::io::Error| Error::Launch(format!("initialising {}: {e}", dir.display()));
    let _ = fs::remove_dir_all(&staging);
    // MySQL's --initialize wants to create the directory itself.
    if flavor == Flavor::MariaDb {
        fs::create_dir_all(&staging).map_err(io)?;
    }
    let result = initialize(server, flavor, &staging, &dir.join("tmp"))
        .and_then(|()| fs::rename(&staging, dir.join("data")).map_err(io));
    let _ = fs::remove_dir_all(&staging);
    result
}

fn initialize(server: &Path, flavor: Flavor, dir: &Path, tmp: &Path) -> Result<(), Error> {
    let mut cmd = match flavor {
        Flavor::MariaDb => {
            let installer = find("mariadb-install-db")
                .or_else(|| find("mysql_install_db"))
                .ok_or_else(|| {
                    Error::Launch("found the MariaDB server but not mariadb-install-db".into())
                })?;
            let mut c = Command::new(installer);
            c.arg("--no-defaults")
                .arg(format!("--datadir={}", dir.display()))
                .arg("--auth-root-authentication-method=normal")
                .arg("--skip-test-db");
            c
        }
        Flavor::MySql => {
            let mut c = Command::new(server);
            c.arg("--no-defaults")
                .arg(format!("--datadir={}", dir.display()))
                .arg("--initialize-insecure");
            c
        }
    };
    cmd.arg(format!("--tmpdir={}", tmp.display()));
    cmd.args(root_user_arg());
    let out = cmd
        .output()
        .map_err(|e| Error::Launch(format!("initialising {}: {e}", dir.display())))?;
    if !out.status.success() {
        return Err(Error::Launch(format!(
            "initialising the database in {} failed:\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
