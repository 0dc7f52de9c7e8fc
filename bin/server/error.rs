//! Every error the HTTP layer can answer with, turned into a response in one place.

use super::http::{loggable, Reply};
use coupons::{Error, TokenProblem};

/// A library error, or a mistake only HTTP can make.
#[derive(Debug)]
pub enum ApiError {
    App(Error),
    /// The body is not JSON (400).
    MalformedJson(String),
    /// The body is JSON of the wrong shape: missing, unknown or mistyped fields (422).
    InvalidBody(String),
    /// The body is over the limit (413).
    TooLarge,
    /// A body that is not `application/json` (415).
    UnsupportedMediaType,
    /// A chunked body: send a Content-Length (411).
    LengthRequired,
    /// No such route (404).
    RouteNotFound,
    /// An `Upgrade` request: nothing here upgrades a connection (400).
    UpgradeRefused,
    /// The route exists with other methods (405, with `Allow`).
    MethodNotAllowed(String),
    /// The bcrypt queue is full (503, with `Retry-After`).
    Overloaded,
    /// A brute-force limit was reached (429, with `Retry-After` in seconds).
    TooManyRequests(u64),
    /// A handler panicked (500).
    Panic,
    /// The service is stopping and did not get to this request (503, with `Retry-After`).
    ShuttingDown,
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::App(e)
    }
}

impl ApiError {
    /// The response for this error. Server faults are logged here, with the whole error, and
    /// never described to the client. `what` names the request, already [`loggable`].
    pub fn reply(&self, what: &str) -> Reply {
        use ApiError as A;
        let (status, code, detail) = self.parts();
        match self {
            A::App(
                e @ (Error::Unavailable(_)
                | Error::Database(_)
                | Error::Internal(_)
                | Error::Launch(_)),
            ) => {
                // A server's message may quote a value the client sent.
                eprintln!("coupons: {what}: {}", loggable(&e.to_string()))
            }
            A::Panic => eprintln!("coupons: {what}: handler panicked"),
            _ => {}
        }
        let mut reply = Reply::json(
            status,
            &serde_json::json!({ "detail": detail, "code": code }),
        );
        match self {
            A::MethodNotAllowed(allow) => reply.headers.push(("Allow", allow.clone())),
            A::TooManyRequests(secs) => reply.headers.push(("Retry-After", secs.to_string())),
            A::App(Error::Busy | Error::Unavailable(_)) | A::Overloaded | A::ShuttingDown => {
                reply.headers.push(("Retry-After", "1".to_owned()))
            }
            A::App(Error::Token(_) | Error::BadCredentials) => reply
                .headers
                .push(("WWW-Authenticate", "Bearer".to_owned())),
            _ => {}
        }
        reply
    }

    /// Status, stable code and message for people: the one mapping of errors to HTTP.
    pub fn parts(&self) -> (u16, String, String) {
        use ApiError as A;
        match self {
            A::App(e) => app_parts(e),
            A::MalformedJson(why) => (
                400,
                "malformed_json".into(),
                format!("malformed JSON: {why}"),
            ),
            A::InvalidBody(why) => (422, "invalid_body".into(), format!("invalid body: {why}")),
            A::TooLarge => (
                413,
                "payload_too_large".into(),
                "request body over the limit: 64 KiB, 8 MiB for an import of codes".into(),
            ),
            A::UnsupportedMediaType => (
                415,
                "unsupported_media_type".into(),
                "send the body as Content-Type: application/json".into(),
            ),
            A::RouteNotFound => (404, "not_found".into(), "no such route".into()),
            A::UpgradeRefused => (
                400,
                "upgrade_not_supported".into(),
                "this service does not upgrade connections".into(),
            ),
            A::LengthRequired => (
                411,
                "length_required".into(),
                "send the body with a Content-Length".into(),
            ),
            A::MethodNotAllowed(allow) => (
                405,
                "method_not_allowed".into(),
                format!("method not allowed; allowed: {allow}"),
            ),
            A::Overloaded => (
                503,
                "overloaded".into(),
                "too many logins at once, try again shortly".into(),
            ),
            A::TooManyRequests(secs) => (
                429,
                "too_many_requests".into(),
                format!("too many attempts; try again in {secs} s"),
            ),
            A::ShuttingDown => (
                503,
                "shutting_down".into(),
                "the service is stopping, try again".into(),
            ),
            A::Panic => (500, "internal".into(), "internal server error".into()),
        }
    }
}

/// Status, stable code and message for a library error.
pub fn app_parts(e: &Error) -> (u16, String, String) {
    match e {
        Error::Invalid { field, reason } => {
            (422, format!("invalid_{field}"), format!("{field} {reason}"))
        }
        Error::EmailTaken => (409, "email_taken".into(), e.to_string()),
        Error::CodeTaken | Error::CodeInUse(_) => (409, "code_taken".into(), e.to_string()),
        Error::CodeUsed => (409, "code_used".into(), e.to_string()),
        Error::PatternExhausted => (422, "pattern_exhausted".into(), e.to_string()),
        Error::StockFromCodes => (409, "stock_from_codes".into(), e.to_string()),
        Error::BadCredentials => (401, "invalid_credentials".into(), e.to_string()),
        Error::Token(p) => {
            let code = match p {
                TokenProblem::Missing => "missing_token",
                TokenProblem::Invalid => "invalid_token",
                TokenProblem::Expired => "token_expired",
                TokenProblem::UnknownUser => "unknown_user",
            };
            (401, code.into(), e.to_string())
        }
        Error::NotAdmin => (403, "admin_required".into(), e.to_string()),
        Error::CouponNotFound => (404, "coupon_not_found".into(), e.to_string()),
        Error::UserNotFound => (404, "user_not_found".into(), e.to_string()),
        Error::ClaimNotFound => (404, "claim_not_found".into(), e.to_string()),
        Error::AlreadyVoided => (409, "already_voided".into(), e.to_string()),
        Error::HoldExpired => (409, "hold_expired".into(), e.to_string()),
        Error::NotActive => (409, "not_active".into(), e.to_string()),
        Error::AlreadyRedeemed => (409, "already_redeemed".into(), e.to_string()),
        Error::OrderMismatch => (422, "order_mismatch".into(), e.to_string()),
        Error::OrderBelowMinimum => (409, "order_below_minimum".into(), e.to_string()),
        Error::CurrencyMismatch => (422, "currency_mismatch".into(), e.to_string()),
        Error::KeyReused => (422, "idempotency_key_reused".into(), e.to_string()),
        Error::SoldOut => (409, "sold_out".into(), e.to_string()),
        Error::Inactive => (409, "inactive".into(), e.to_string()),
        Error::NotStarted => (409, "not_started".into(), e.to_string()),
        Error::Expired => (409, "expired".into(), e.to_string()),
        Error::LimitReached => (409, "limit_reached".into(), e.to_string()),
        Error::CodeLocked => (409, "code_locked".into(), e.to_string()),
        Error::TermsLocked => (409, "terms_locked".into(), e.to_string()),
        Error::WebhookUrlNotAllowed => (422, "webhook_url_not_allowed".into(), e.to_string()),
        Error::WebhookNotFound => (404, "webhook_not_found".into(), e.to_string()),
        Error::Stale => (412, "precondition_failed".into(), e.to_string()),
        Error::Busy => (503, "busy".into(), e.to_string()),
        Error::Unavailable(_) => (
            503,
            "database_unavailable".into(),
            "database unavailable, try again shortly".into(),
        ),
        Error::Database(_) | Error::Internal(_) | Error::Launch(_) => {
            (500, "internal".into(), "internal server error".into())
        }
    }
}
