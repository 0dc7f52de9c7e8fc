//! The binary on its own private MariaDB (no DATABASE_URL), as a newcomer runs it, and its
//! configuration errors.

use crate::support::{coupons_command, Service, TestDb, JSON, SERVICE_VARS};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn data_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("coupons-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run_coupons(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = coupons_command(env).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn socket_answers(dir: &Path) -> bool {
    let opts = mysql::OptsBuilder::new()
        .socket(Some(dir.join("mysql.sock").display().to_string()))
        .user(Some("root"));
    mysql::Conn::new(opts).is_ok()
}

#[test]
fn the_private_database_keeps_data_across_restarts() {
    let dir = data_dir("restart");
    let dir_s = dir.display().to_string();
    let env = [("COUPONS_DATA_DIR", dir_s.as_str()), ("BCRYPT_COST", "4")];

    let svc = Service::spawn(&env);
    let token = svc.register("ada@example.com");
    // `coupons admin promote` from beside the running service attaches to its database.
    let (code, out, err) = run_coupons(&env, &["admin", "promote", "ada@example.com"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ada@example.com is now ADMIN"), "{out}");
    let (code, _, err) = run_coupons(&env, &["admin", "promote", "nobody@example.com"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no user is registered as nobody@example.com"),
        "{err}"
    );
    assert!(
        socket_answers(&dir),
        "the admin command stopped the service's database"
    );

    let auth = format!("Bearer {token}");
    let r = svc.call(
        "POST",
        "/admin/coupons",
        &[JSON, ("Authorization", &auth)],
        Some(r#"{"code":"KEEP","available_count":2}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = svc.call(
        "POST",
        "/coupons/1/claim",
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);

    // The seed's way to make an admin works too, through the mariadb client on the socket.
    let sql = Command::new("mariadb")
        .args([
            "--socket",
            &dir.join("mysql.sock").display().to_string(),
            "-u",
            "root",
            "coupons",
            "-e",
        ])
        .arg("UPDATE users SET role = 'USER' WHERE email = 'ada@example.com'")
        .status()
        .expect("the mariadb client");
    assert!(sql.success());
    let r = svc.call(
        "DELETE",
        "/admin/coupons/1",
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(r.status, 403, "{}", r.body);

    // SIGTERM: a clean stop, status 0, and the private server stopped with it.
    let status = svc.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        !socket_answers(&dir),
        "the private server outlived the service"
    );

    // A second start finds everything, and the generated secret still signs the same tokens.
    let svc = Service::spawn(&env);
    let r = svc.call(
        "GET",
        "/users/me/history",
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body[0]["code"], "KEEP");
    let r = svc.call("GET", "/coupons", &[], None);
    assert_eq!(r.body[0]["available_count"], 1);
    svc.login("ada@example.com");
    assert!(svc.stop().success());
    let secret = std::fs::read_to_string(dir.join("jwt-secret")).unwrap();
    assert!(secret.len() >= 32);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migrate_is_idempotent_from_the_command_line() {
    let db = TestDb::new();
    for _ in 0..2 {
        let (code, out, err) = run_coupons(&[("DATABASE_URL", &db.url)], &["migrate"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("schema is up to date"));
    }
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM schema_migrations"),
        crate::support::migrations()
    );
}

#[test]
fn bad_configuration_stops_start_up_naming_the_variable() {
    let db = TestDb::new();
    let url = db.url.as_str();
    let secret = "s".repeat(32);
    for (env, variable) in [
        (vec![("BCRYPT_COST", "many")], "BCRYPT_COST"),
        (vec![("BCRYPT_COST", "3")], "BCRYPT_COST"),
        (vec![("WORKERS", "0")], "WORKERS"),
        (vec![("DB_POOL_SIZE", "-1")], "DB_POOL_SIZE"),
        (vec![("TOKEN_TTL_SECS", "1h")], "TOKEN_TTL_SECS"),
        (vec![("BIND_ADDR", "localhost")], "BIND_ADDR"),
        (vec![("JWT_SECRET", "too-short")], "JWT_SECRET"),
        (vec![("DATABASE_URL", url)], "JWT_SECRET"),
        (
            vec![("DATABASE_URL", "postgres://x"), ("JWT_SECRET", &secret)],
            "URL",
        ),
    ] {
        let (code, out, err) = run_coupons(&env, &["serve"]);
        assert_ne!(code, 0, "{env:?}: {out}");
        assert!(err.contains(variable), "{env:?}: {err}");
        assert!(!err.contains(&secret), "the secret was printed");
    }
    let (code, _, err) = run_coupons(&[], &["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("Usage"));
    let (code, out, _) = run_coupons(&[], &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("admin promote EMAIL"));
}

/// A private data directory or `jwt-secret` that group or others may open, or that another
/// user owns, stops start-up with an error naming it, before anything starts there: its owner
/// could plant the secret (and sign any token) or reach the database's socket as root.
#[test]
fn a_data_directory_or_secret_others_can_reach_is_refused() {
    use coupons::auth::Secret;
    use coupons::embedded::{check_private, EmbeddedServer};
    use std::os::unix::fs::{chown, PermissionsExt};
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let refused = |path: &Path, err: String, why: &str| {
        let named = path.canonicalize().unwrap().display().to_string();
        assert!(err.contains(&named) && err.contains(why), "{err}");
    };
    let dir = data_dir("open");
    std::fs::create_dir_all(&dir).unwrap();
    let dir_s = dir.display().to_string();
    for mode in [0o770, 0o755, 0o701] {
        set_mode(&dir, mode);
        let err = EmbeddedServer::start(&dir).err().map(|e| e.to_string());
        refused(&dir, err.unwrap_or_default(), "open to group or others");
    }
    // From the binary: a start-up error naming the path and the variable.
    let (code, out, err) = run_coupons(&[("COUPONS_DATA_DIR", dir_s.as_str())], &["migrate"]);
    assert_eq!(code, 1, "{out}{err}");
    refused(&dir, err.clone(), "open to group or others");
    assert!(err.contains("COUPONS_DATA_DIR"), "{err}");
    assert!(!dir.join("data").exists(), "a database was set up in it");

    set_mode(&dir, 0o700);
    let secret = dir.join("jwt-secret");
    std::fs::write(&secret, "s".repeat(64)).unwrap();
    for mode in [0o640, 0o604] {
        set_mode(&secret, mode);
        let err = Secret::load_or_create(&secret).unwrap_err();
        refused(&secret, err.to_string(), "open to group or others");
    }
    set_mode(&secret, 0o600);
    assert!(Secret::load_or_create(&secret).is_ok());

    // Another user's: as root the tests give the directory and the secret to `nobody`;
    // otherwise `/` (root's) stands for a path another user owns.
    const NOBODY: u32 = 65534;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        chown(&secret, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = Secret::load_or_create(&secret).unwrap_err();
        refused(&secret, err.to_string(), "belongs to uid 65534");
        chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = EmbeddedServer::start(&dir).err().map(|e| e.to_string());
        refused(&dir, err.unwrap_or_default(), "belongs to uid 65534");
        assert!(!dir.join("data").exists(), "a database was set up in it");
    } else {
        let err = check_private(Path::new("/")).unwrap_err();
        refused(Path::new("/"), err.to_string(), "belongs to uid 0");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The variables `bin/server/config.rs` reads, from its source: every string literal that is a call's
/// first argument and looks like a variable's name (`var("X")`, `number(\n "X", ...)`,
/// `std::env::var("X")`). Error messages and defaults are not such literals.
fn variables_config_reads() -> BTreeSet<String> {
    let source = include_str!("../../bin/server/config.rs");
    let mut names = BTreeSet::new();
    let mut rest = source;
    while let Some(open) = rest.find('"') {
        let first_argument = rest[..open].trim_end().ends_with('(');
        let mut chars = rest[open + 1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        let literal = &rest[open + 1..open + 1 + end];
        let name_like = literal.starts_with(|c: char| c.is_ascii_uppercase())
            && literal
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if first_argument && name_like {
            names.insert(literal.to_owned());
        }
        rest = &rest[open + 1 + end + 1..];
    }
    names
}

#[test]
fn the_tests_start_coupons_with_none_of_the_variables_config_reads_inherited() {
    let read = variables_config_reads();
    assert!(
        read.contains("DATABASE_URL") && read.contains("CLAIM_LANES"),
        "the scan of bin/server/config.rs missed names: {read:?}"
    );
    let listed: BTreeSet<String> = SERVICE_VARS.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        listed, read,
        "support::SERVICE_VARS must list exactly the variables bin/server/config.rs reads"
    );
    // And the command really removes each one (None: removed from what it inherits).
    let cmd = coupons_command(&[]);
    let removed: BTreeSet<String> = cmd
        .get_envs()
        .filter(|(_, value)| value.is_none())
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    assert_eq!(removed, read);
}

#[test]
fn a_database_outage_is_a_503_and_the_service_recovers_by_itself() {
    use coupons::embedded::EmbeddedServer;
    let dir = data_dir("outage");
    let server = EmbeddedServer::start(&dir).unwrap();
    let url = server.url("coupons");
    let svc = Service::spawn(&[
        ("DATABASE_URL", &url),
        ("JWT_SECRET", crate::support::SECRET),
        ("BCRYPT_COST", "4"),
    ]);
    let token = svc.register("ada@example.com");
    let auth = ("Authorization", format!("Bearer {token}"));
    assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);

    server.stop().unwrap();
    for (method, path) in [
        ("GET", "/healthz"),
        ("POST", "/coupons/1/claim"),
        ("GET", "/coupons"),
    ] {
        let r = svc.call(method, path, &[(auth.0, &auth.1)], None);
        assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
        assert_eq!(r.body["code"], "database_unavailable");
        assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
        assert!(
            !r.body.to_string().contains("mysql.sock"),
            "database text leaked: {}",
            r.body
        );
    }

    // Back up: the same service answers again without a restart.
    let server = EmbeddedServer::start(&dir).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while svc.call("GET", "/healthz", &[], None).status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the service did not recover"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let r = svc.call("GET", "/users/me/history", &[(auth.0, &auth.1)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    drop(svc);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_short_sellout_loadtest_hands_out_exactly_the_stock() {
    let (code, out, err) = run_coupons(
        &[],
        &[
            "loadtest",
            "--embedded",
            "--scenario",
            "sellout",
            "--connections",
            "16",
            "--stock",
            "150",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["invariant_ok"], true, "{summary}");
    assert_eq!(summary["successes"], 150, "{summary}");
    assert_eq!(summary["status_counts"]["201"], 150, "{summary}");
    assert_eq!(summary["status_counts"]["409"], 600, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
}

#[test]
fn a_signal_during_start_up_still_stops_cleanly() {
    let dir = data_dir("early-stop");
    let dir_s = dir.display().to_string();
    let env = [
        ("COUPONS_DATA_DIR", dir_s.as_str()),
        ("BIND_ADDR", "127.0.0.1:0"),
    ];
    let mut child = coupons_command(&env)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The private database is initialising and starting now.
    std::thread::sleep(std::time::Duration::from_millis(400));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket_answers(&dir));
    // And the directory is usable afterwards: a normal start and stop.
    let svc = Service::spawn(&[("COUPONS_DATA_DIR", dir_s.as_str()), ("BCRYPT_COST", "4")]);
    assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
    assert!(svc.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_service_starts_before_its_database_and_serves_when_it_comes() {
    use coupons::embedded::EmbeddedServer;
    let dir = data_dir("late-db");
    let server = EmbeddedServer::start(&dir).unwrap();
    let url = server.url("coupons");
    server.stop().unwrap();

    let svc = Service::spawn(&[
        ("DATABASE_URL", &url),
        ("JWT_SECRET", crate::support::SECRET),
        ("BCRYPT_COST", "4"),
        ("DB_POOL_WAIT_MS", "500"),
    ]);
    for path in ["/healthz", "/coupons"] {
        let r = svc.call("GET", path, &[], None);
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_eq!(r.body["code"], "database_unavailable");
        assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    }

    let server = EmbeddedServer::start(&dir).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while svc.call("GET", "/healthz", &[], None).status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the service never noticed the database"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    svc.register("late@example.com");
    assert_eq!(svc.call("GET", "/coupons", &[], None).status, 200);
    drop(svc);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
