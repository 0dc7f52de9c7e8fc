//! # coupons
//!
//! A concurrency-safe coupon service as a library: users register and log in (bcrypt, JWT),
//! admins create coupons with limited stock, and users claim them. A claim is one locked
//! transaction in MySQL or MariaDB, so the stock is never over-claimed, however many threads,
//! processes or machines claim at once. Concurrent claims share transactions, which takes a hot
//! coupon from a few thousand claims a second to tens of thousands.
//!
//! The `coupons` binary serves this library over HTTP; an embedding program calls it directly:
//!
//! ```no_run
//! use coupons::{auth::{Auth, Secret}, claim::Claims, coupon, db};
//! use coupons::{CouponCode, Email, Password, Status, Stock};
//!
//! fn main() -> Result<(), coupons::Error> {
//!     let opts = db::opts_from_url("mysql://root:secret@127.0.0.1:3306/coupons")?;
//!     db::create_database(&opts)?;
//!     let pool = db::pool(opts, 8, db::CHECKOUT_TIMEOUT)?;
//!     db::migrate(&pool)?;
//!
//!     let auth = Auth::new(&Secret::generate()?, 7200, 12)?;
//!     let ada = auth.register(&pool, &Email::parse("ada@example.com")?, &Password::parse("correct horse")?)?;
//!
//!     let welcome = coupon::create(&pool, ada.id, &coupon::NewCoupon {
//!         code: CouponCode::parse("WELCOME10")?,
//!         available_count: Stock::parse(100)?,
//!         status: Status::Active,
//!         rules: coupon::Rules::default(),
//!     })?;
//!     // One `Claims` per process: it combines concurrent claims into shared transactions.
//!     let claims = Claims::new(pool.clone());
//!     let claimed = claims.claim(ada.id, welcome.id)?;
//!     assert_eq!(claimed.available_count, 99);
//!     Ok(())
//! }
//! ```
//!
//! Without a server at hand, [`embedded::EmbeddedServer`] starts a private one from the
//! system's MariaDB binaries.

#![deny(missing_docs)]
pub mod audit;
pub mod auth;
pub mod claim;
pub mod codes;
mod combine;
mod counts;
pub mod coupon;
pub mod db;
pub mod embedded;
mod error;
pub mod events;
pub mod fds;
mod gate;
mod group;
pub mod idempotency;
pub mod life;
mod random;
mod ticker;
mod types;
pub mod webhooks;

pub use error::{Error, TokenProblem};
pub use types::{
    Amount, ClaimId, ClaimStatus, CouponCode, CouponId, Currency, Email, HoldSeconds, Label,
    Metadata, OrderId, Page, Password, PerUserLimit, PercentOff, Role, Status, Stock, Timestamp,
    UserId,
};
