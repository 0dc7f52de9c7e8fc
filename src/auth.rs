//! Users, passwords and tokens: register, log in, check a token, check a role.

use crate::db::{with_conn, Pool};
use crate::error::{OnConstraint, TokenProblem};
use crate::{Email, Error, Password, Role, Timestamp, UserId};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mysql::prelude::Queryable;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Read;
use std::path::Path;

/// The key that signs tokens (HS256): at least 32 bytes. `Debug` never prints it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Refuses secrets shorter than 32 bytes (RFC 7518 asks for at least the hash size).
    pub fn parse(s: &str) -> Result<Secret, Error> {
        if s.len() < 32 {
            return Err(Error::invalid("JWT_SECRET", "must be at least 32 bytes"));
        }
        Ok(Secret(s.as_bytes().to_vec()))
    }

    /// 32 random bytes from the operating system, hex-encoded.
    pub fn generate() -> Result<Secret, Error> {
        let bytes = crate::random::Random::new()?.bytes::<32>()?;
        Secret::parse(&crate::random::hex(&bytes))
    }

    /// Reads the secret kept at `path`, or generates one and keeps it there (mode 0600), so
    /// that tokens stay valid across restarts. A file that another user owns, or that group or
    /// others may open, is refused ([`crate::embedded::check_private`]): whoever could write
    /// it could sign any token.
    pub fn load_or_create(path: &Path) -> Result<Secret, Error> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| Error::Launch(format!("{}: {e}", path.display()));
        match std::fs::File::open(path) {
            Ok(mut file) => {
                crate::embedded::check_private(path)?;
                let mut s = String::new();
                file.read_to_string(&mut s).map_err(io)?;
                return Secret::parse(s.trim());
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            Err(_) => {}
        }
        let secret = Secret::generate()?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(&secret.0).map_err(io)?;
        Ok(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A registered user, as shown to clients (never the hash).
#[derive(Debug, Clone, Serialize)]
pub struct User {
    /// The user's id.
    pub id: UserId,
    /// The normalised email.
    pub email: String,
    #[serde(serialize_with = "role_str")]
    /// USER or ADMIN.
    pub role: Role,
}

fn role_str<S: serde::Serializer>(r: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

/// A signed token and how many seconds it stays valid.
#[derive(Debug, Clone)]
pub struct Token {
    /// The JWT.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// Who a valid token speaks for. `role` is what the token says; admin rights are checked
/// against the database by [`require_admin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// The user the token was issued to.
    pub user_id: UserId,
    /// The role the token claims.
    pub role: Role,
}

/// The `iss` of every token: a token from another issuer is refused even if the key matches.
pub const ISSUER: &str = "coupons";

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    role: String,
    iat: u64,
    exp: u64,
}

/// Password hashing and token signing, configured once.
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
    cost: u32,
    /// Verified against when the email is unknown, so both failures take the same time.
    dummy_hash: String,
}

impl Auth {
    /// `ttl_secs` is each token's lifetime; `bcrypt_cost` is 4 to 31 (12 takes about 0.3 s of CPU).
    pub fn new(secret: &Secret, ttl_secs: u64, bcrypt_cost: u32) -> Result<Auth, Error> {
        if !(4..=31).contains(&bcrypt_cost) {
            return Err(Error::invalid("BCRYPT_COST", "must be 4 to 31"));
        }
        if ttl_secs == 0 {
            return Err(Error::invalid("TOKEN_TTL_SECS", "must be at least 1"));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "iat", "iss"]);
        validation.set_issuer(&[ISSUER]);
        // Not checked unless asked: a token whose `nbf` (not before) is still ahead is refused.
        validation.validate_nbf = true;
        validation.leeway = 5;
        let dummy_hash = bcrypt::non_truncating_hash("not-a-real-password", bcrypt_cost)
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Auth {
            encoding: EncodingKey::from_secret(&secret.0),
            decoding: DecodingKey::from_secret(&secret.0),
            validation,
            ttl_secs,
            cost: bcrypt_cost,
            dummy_hash,
        })
    }

    /// Creates a user with role USER. Fails with [`Error::EmailTaken`] if the email is registered.
    pub fn register(&self, pool: &Pool, email: &Email, password: &Password) -> Result<User, Error> {
        // bcrypt hashes the password and a NUL, cut at 72 bytes: a `Password` has at most 72, so
        // only the NUL can fall off. (`non_truncating_hash` refuses 72 bytes for that NUL.)
        let hash = bcrypt::hash(password.as_bytes(), self.cost)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let id = with_conn(pool, |conn| {
            conn.exec_drop(
                "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, ?, 'USER', ?)",
                (email.as_str(), &hash, Timestamp::now()),
            )?;
            Ok(conn.last_insert_id())
        })
        .on_duplicate(Error::EmailTaken)?;
        Ok(User {
            id: UserId(id),
            email: email.as_str().to_owned(),
            role: Role::User,
        })
    }

    /// Checks the password and issues a token. An unknown email and a wrong password give the
    /// same [`Error::BadCredentials`] after the same amount of hashing work.
    pub fn login(&self, pool: &Pool, email: &str, password: &str) -> Result<Token, Error> {
        let row: Option<(u64, String, String)> = match Email::parse(email) {
            Ok(email) => with_conn(pool, |conn| {
                Ok(conn.exec_first(
                    "SELECT id, password_hash, role FROM users WHERE email = ?",
                    (email.as_str(),),
                )?)
            })?,
            Err(_) => None,
        };
        let hash = row.as_ref().map_or(&self.dummy_hash, |(_, h, _)| h);
        // As in `register`: at most 72 bytes, which bcrypt reads whole; a longer one never matches.
        let fits = password.len() <= 72;
        let matches = fits && bcrypt::verify(password, hash).unwrap_or(false);
        match row {
            Some((id, _, role)) if matches => self.issue(UserId(id), Role::from_db(&role)),
            _ => Err(Error::BadCredentials),
        }
    }

    /// Signs a token for `user`, valid for the configured lifetime from now.
    pub fn issue(&self, user: UserId, role: Role) -> Result<Token, Error> {
        let iat = Timestamp::now().unix_secs() as u64;
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: user.to_string(),
            role: role.as_str().to_owned(),
            iat,
            exp: iat + self.ttl_secs,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Token {
            token,
            expires_in: self.ttl_secs,
        })
    }

    /// Checks a token's signature (HS256 only), expiry, `nbf` if it has one, and shape. It does not look the user
    /// up; functions that act for a user do that themselves.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, Error> {
        let token = token.ok_or(Error::Token(TokenProblem::Missing))?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Error::Token(TokenProblem::Expired),
                _ => Error::Token(TokenProblem::Invalid),
            })?;
        let user_id = data
            .claims
            .sub
            .parse::<UserId>()
            .map_err(|_| Error::Token(TokenProblem::Invalid))?;
        let role = match data.claims.role.as_str() {
            "USER" => Role::User,
            "ADMIN" => Role::Admin,
            _ => return Err(Error::Token(TokenProblem::Invalid)),
        };
        Ok(Principal { user_id, role })
    }
}

/// Succeeds only if the principal's user exists and is an admin in the database now,
/// whatever the token says.
pub fn require_admin(pool: &Pool, who: &Principal) -> Result<(), Error> {
    match user_role(pool, who.user_id)? {
        Some(Role::Admin) => Ok(()),
        Some(Role::User) => Err(Error::NotAdmin),
        None => Err(Error::Token(TokenProblem::UnknownUser)),
    }
}

/// The user's current role, or `None` if no such user exists.
pub fn user_role(pool: &Pool, user: UserId) -> Result<Option<Role>, Error> {
    with_conn(pool, |conn| {
        let role: Option<String> =
            conn.exec_first("SELECT role FROM users WHERE id = ?", (user.0,))?;
        Ok(role.map(|r| Role::from_db(&r)))
    })
}

/// Sets a user's role by email (the `coupons admin promote/demote` commands).
pub fn set_role(pool: &Pool, email: &Email, role: Role) -> Result<User, Error> {
    with_conn(pool, |conn| {
        conn.exec_drop(
            "UPDATE users SET role = ? WHERE email = ?",
            (role.as_str(), email.as_str()),
        )?;
        let id: Option<u64> =
            conn.exec_first("SELECT id FROM users WHERE email = ?", (email.as_str(),))?;
        let id = id.ok_or(Error::UserNotFound)?;
        Ok(User {
            id: UserId(id),
            email: email.as_str().to_owned(),
            role,
        })
    })
}
