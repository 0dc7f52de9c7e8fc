//! The one error type of the library. Each variant's doc says which HTTP status the
//! binary turns it into; the mapping itself lives in one `match` in `bin/`.

use std::fmt;

/// Why a token was refused (all become 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    /// No token was sent.
    Missing,
    /// Malformed, wrongly signed, or signed with another algorithm.
    Invalid,
    /// Past its `exp`.
    Expired,
    /// Well signed, but its user no longer exists.
    UnknownUser,
}

/// Everything that can go wrong in the library.
#[derive(Debug)]
pub enum Error {
    /// An input failed to parse (422). `field` names the input, `reason` is for people.
    Invalid {
        /// The input's name, e.g. `email`.
        field: &'static str,
        /// What is wrong, for people.
        reason: String,
    },
    /// The email is already registered (409 `email_taken`).
    EmailTaken,
    /// Another live coupon has this code, compared case-insensitively (409 `code_taken`).
    CodeTaken,
    /// A unique code of an import is in use already (by any coupon's codes or a live coupon's
    /// own code) or given twice; names the first such code (409 `code_taken`).
    CodeInUse(String),
    /// The unique code claimed is held by a held, claimed or redeemed claim (409 `code_used`).
    CodeUsed,
    /// The pattern cannot give that many new codes (422 `pattern_exhausted`).
    PatternExhausted,
    /// The coupon has unique codes: its stock is its unassigned codes, never set by hand (409
    /// `stock_from_codes`).
    StockFromCodes,
    /// Unknown email or wrong password, deliberately indistinguishable (401 `invalid_credentials`).
    BadCredentials,
    /// The token was missing or refused (401).
    Token(TokenProblem),
    /// The caller is not an admin according to the database (403 `admin_required`).
    NotAdmin,
    /// No live coupon has this id (404 `coupon_not_found`).
    CouponNotFound,
    /// No user has this email (404 `user_not_found`; used by the admin commands).
    UserNotFound,
    /// No claim has this id (404 `claim_not_found`).
    ClaimNotFound,
    /// The claim was voided already (409 `already_voided`).
    AlreadyVoided,
    /// The hold ran out before it was confirmed or redeemed (409 `hold_expired`).
    HoldExpired,
    /// The claim was released, expired or voided: nothing more can happen to it (409
    /// `not_active`).
    NotActive,
    /// The claim was redeemed before, against another order (409 `already_redeemed`).
    AlreadyRedeemed,
    /// The order's id was redeemed with another amount or currency (422 `order_mismatch`).
    OrderMismatch,
    /// The order is below the coupon's `min_order_amount` (409 `order_below_minimum`).
    OrderBelowMinimum,
    /// The order's currency is not the coupon's (422 `currency_mismatch`).
    CurrencyMismatch,
    /// The idempotency key was used before for a different request (422 `idempotency_key_reused`).
    KeyReused,
    /// The coupon has no stock left (409 `sold_out`).
    SoldOut,
    /// The coupon exists but is not active (409 `inactive`).
    Inactive,
    /// The coupon's validity window has not begun (409 `not_started`).
    NotStarted,
    /// The coupon's validity window is over (409 `expired`).
    Expired,
    /// The user holds as many claims of this coupon as its per-user limit (409 `limit_reached`).
    LimitReached,
    /// The coupon has claims, so its code can no longer change (409 `code_locked`).
    CodeLocked,
    /// The coupon has claims, so what it is worth (`percent_off`, `amount_off`, `currency`,
    /// `min_order_amount`) can no longer change (409 `terms_locked`).
    TermsLocked,
    /// A webhook's URL names (or resolves to) a private, loopback, link-local or otherwise
    /// internal address (422 `webhook_url_not_allowed`).
    WebhookUrlNotAllowed,
    /// No webhook has this id (404 `webhook_not_found`).
    WebhookNotFound,
    /// The coupon changed since the version the caller read (412 `precondition_failed`).
    Stale,
    /// Deadlocks or lock-wait timeouts outlasted the retries (503 `busy`, with Retry-After).
    Busy,
    /// The database cannot be reached or refused the connection (503 `database_unavailable`,
    /// with Retry-After). The text is for logs, never for clients.
    Unavailable(String),
    /// Any other database error (500; logged, never shown).
    Database(mysql::Error),
    /// Anything else that is our fault, e.g. a hashing failure (500; logged, never shown).
    Internal(String),
    /// The private database server could not be set up or started (a start-up error).
    Launch(String),
}

impl Error {
    /// An [`Error::Invalid`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The server error code, when this came from the server.
    pub(crate) fn server_code(&self) -> Option<u16> {
        match self {
            Error::Database(mysql::Error::MySqlError(e)) => Some(e.code),
            _ => None,
        }
    }

    /// The name an idempotency key records for this refusal; `None` for errors that are not an
    /// answer (faults, which roll back and may be retried).
    pub(crate) fn outcome(&self) -> Option<&'static str> {
        match self {
            Error::SoldOut => Some("sold_out"),
            Error::Inactive => Some("inactive"),
            Error::CouponNotFound => Some("coupon_not_found"),
            Error::CodeTaken => Some("code_taken"),
            Error::CodeUsed => Some("code_used"),
            Error::NotStarted => Some("not_started"),
            Error::Expired => Some("expired"),
            Error::LimitReached => Some("limit_reached"),
            Error::TermsLocked => Some("terms_locked"),
            _ => None,
        }
    }

    /// The refusal an idempotency key recorded, back as an error.
    pub(crate) fn from_outcome(outcome: &str) -> Error {
        match outcome {
            "sold_out" => Error::SoldOut,
            "inactive" => Error::Inactive,
            "coupon_not_found" => Error::CouponNotFound,
            "code_taken" => Error::CodeTaken,
            "code_used" => Error::CodeUsed,
            "not_started" => Error::NotStarted,
            "expired" => Error::Expired,
            "limit_reached" => Error::LimitReached,
            "terms_locked" => Error::TermsLocked,
            other => Error::Internal(format!("unknown recorded outcome {other:?}")),
        }
    }

    /// A transaction the server rolled back under us without saying so (seen on Galera: a
    /// claim batch's own rows gone from its next read after another node's claim of the same
    /// coupon won certification). Made a deadlock (1213), so that it is retried as one.
    pub(crate) fn rolled_back(why: &str) -> Error {
        Error::Database(mysql::Error::MySqlError(mysql::error::MySqlError {
            state: "40001".into(),
            message: why.into(),
            code: 1213,
        }))
    }

    /// Deadlock or a Galera certification failure (1213), lock-wait timeout (1205, also a
    /// Galera `wsrep_sync_wait` timeout), or a row changed since the snapshot (1020, MariaDB
    /// 11.6+ `innodb_snapshot_isolation`): the whole transaction may be retried.
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(self.server_code(), Some(1213 | 1205 | 1020))
    }

    /// A Galera node outside the primary component or not yet synced (1047): a view change
    /// passes in moments, so a transaction retries it; a rejoin takes seconds, so after the
    /// retries it is [`Error::Unavailable`].
    pub(crate) fn is_node_not_ready(&self) -> bool {
        self.server_code() == Some(1047)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { field, reason } => write!(f, "invalid {field}: {reason}"),
            Error::EmailTaken => f.write_str("email already registered"),
            Error::CodeTaken => f.write_str("coupon code already in use"),
            Error::CodeInUse(code) => write!(f, "code {code} is already in use"),
            Error::CodeUsed => f.write_str("this code was claimed already"),
            Error::PatternExhausted => {
                f.write_str("the pattern has not that many codes left")
            }
            Error::StockFromCodes => f.write_str(
                "the coupon has unique codes: its stock is its unassigned codes; add codes instead",
            ),
            Error::BadCredentials => f.write_str("invalid email or password"),
            Error::Token(TokenProblem::Missing) => f.write_str("authentication required"),
            Error::Token(TokenProblem::Invalid) => f.write_str("invalid token"),
            Error::Token(TokenProblem::Expired) => f.write_str("token expired"),
            Error::Token(TokenProblem::UnknownUser) => f.write_str("token user no longer exists"),
            Error::NotAdmin => f.write_str("admin access required"),
            Error::CouponNotFound => f.write_str("coupon not found"),
            Error::UserNotFound => f.write_str("user not found"),
            Error::ClaimNotFound => f.write_str("claim not found"),
            Error::AlreadyVoided => f.write_str("the claim was voided already"),
            Error::HoldExpired => f.write_str("the hold has expired"),
            Error::NotActive => f.write_str("the claim was released, expired or voided"),
            Error::AlreadyRedeemed => f.write_str("the claim was redeemed for another order"),
            Error::OrderMismatch => {
                f.write_str("this order was redeemed with another amount or currency")
            }
            Error::OrderBelowMinimum => f.write_str("the order is below the coupon's minimum"),
            Error::CurrencyMismatch => f.write_str("the order's currency is not the coupon's"),
            Error::KeyReused => f.write_str("this Idempotency-Key was used for another request"),
            Error::SoldOut => f.write_str("No coupons available"),
            Error::Inactive => f.write_str("coupon is not active"),
            Error::NotStarted => f.write_str("coupon is not valid yet"),
            Error::Expired => f.write_str("coupon has expired"),
            Error::LimitReached => f.write_str("you hold as many of this coupon as one user may"),
            Error::CodeLocked => {
                f.write_str("the coupon has claims; its code can no longer change")
            }
            Error::TermsLocked => f.write_str(
                "the coupon has claims; its percent_off, amount_off, currency and min_order_amount can no longer change",
            ),
            Error::WebhookUrlNotAllowed => f.write_str(
                "the webhook's URL is a private, loopback, link-local or internal address",
            ),
            Error::WebhookNotFound => f.write_str("webhook not found"),
            Error::Stale => f.write_str("the coupon changed since you read it; read it again"),
            Error::Busy => f.write_str("too much contention, try again"),
            Error::Unavailable(e) => write!(f, "database unavailable: {e}"),
            Error::Database(e) => write!(f, "database error: {e}"),
            Error::Internal(e) => write!(f, "internal error: {e}"),
            Error::Launch(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database(e) => Some(e),
            _ => None,
        }
    }
}

impl From<mysql::Error> for Error {
    fn from(e: mysql::Error) -> Error {
        use mysql::DriverError as D;
        let unreachable = match &e {
            mysql::Error::IoError(_) | mysql::Error::CodecError(_) => true,
            mysql::Error::DriverError(
                D::ConnectTimeout | D::CouldNotConnect(_) | D::Timeout | D::PacketOutOfSync,
            ) => true,
            // Too many connections, shutdown in progress, connection killed, read-only
            // (failover), interrupted, lost or timed-out connections. (1047, a Galera node not
            // ready, stays a server error here: a transaction retries it a few times first.)
            mysql::Error::MySqlError(s) => matches!(
                s.code,
                1040 | 1053 | 1927 | 1290 | 1836 | 1792 | 1317 | 1969 | 4031 | 1158..=1161
            ),
            _ => false,
        };
        if unreachable {
            Error::Unavailable(e.to_string())
        } else {
            Error::Database(e)
        }
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Error {
        Error::Unavailable(e.to_string())
    }
}

/// Turns a server constraint violation into a domain error, in one place.
pub(crate) trait OnConstraint<T> {
    /// A duplicate key (1062) becomes `err`.
    fn on_duplicate(self, err: Error) -> Result<T, Error>;
    /// A missing parent row (1452) becomes `err`.
    fn on_foreign_key(self, err: Error) -> Result<T, Error>;
}

impl<T> OnConstraint<T> for Result<T, Error> {
    fn on_duplicate(self, err: Error) -> Result<T, Error> {
        match self {
            Err(e) if e.server_code() == Some(1062) => Err(err),
            other => other,
        }
    }

    fn on_foreign_key(self, err: Error) -> Result<T, Error> {
        match self {
            Err(e) if e.server_code() == Some(1452) => Err(err),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn a_transaction_rolled_back_under_us_is_retried_as_a_deadlock_is() {
        let e = Error::rolled_back("claim rows gone after their insert");
        assert!(e.is_conflict(), "{e}");
        assert!(!Error::Internal("x".into()).is_conflict());
    }
}
