//! The claim: everything that decides whether a claim succeeds is in [`claim`].

use crate::coupon::lock_live;
use crate::db::{transaction, with_conn, Pool};
use crate::error::TokenProblem;
use crate::{ClaimId, CouponId, Error, Status, Timestamp, UserId};
use mysql::prelude::Queryable;
use serde::Serialize;

/// One granted unit of a coupon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    /// The claim's id.
    pub id: ClaimId,
    /// The coupon claimed.
    pub coupon_id: CouponId,
    /// The coupon's code.
    pub code: String,
    /// When the claim committed (service clock, UTC).
    pub claimed_at: Timestamp,
}

/// A successful claim and the stock left right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The new claim.
    pub claim: Claim,
    /// Units left right after this claim.
    pub available_count: u64,
}

/// One line of a user's claim history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The claim's id.
    pub claim_id: ClaimId,
    /// The coupon claimed.
    pub coupon_id: CouponId,
    /// The coupon's code.
    pub code: String,
    /// When the claim committed (UTC).
    pub claimed_at: Timestamp,
}

/// Claims one unit of `coupon` for `user`, in one transaction that holds the coupon row's lock
/// from the check to the commit, so concurrent claims can never take more than the stock.
/// A user may claim the same coupon again while stock lasts.
///
/// Errors: [`Error::CouponNotFound`] (unknown or deleted), [`Error::Inactive`],
/// [`Error::SoldOut`], [`Error::Token`] if the user no longer exists, [`Error::Busy`] if
/// deadlocks or lock-wait timeouts outlast the retries.
pub fn claim(pool: &Pool, user: UserId, coupon: CouponId) -> Result<Claimed, Error> {
    transaction(pool, |tx| {
        let c = lock_live(tx, coupon)?.ok_or(Error::CouponNotFound)?;
        if c.status != Status::Active {
            return Err(Error::Inactive);
        }
        if c.available_count == 0 {
            return Err(Error::SoldOut);
        }
        tx.exec_drop(
            "UPDATE coupons SET available_count = available_count - 1 WHERE id = ?",
            (coupon.0,),
        )?;
        let claimed_at = Timestamp::now();
        let inserted = tx.exec_drop(
            "INSERT INTO claims (user_id, coupon_id, claimed_at) VALUES (?, ?, ?)",
            (user.0, coupon.0, claimed_at),
        );
        match inserted.map_err(Error::from) {
            // The user foreign key: the token's user was deleted.
            Err(e) if e.server_code() == Some(1452) => {
                return Err(Error::Token(TokenProblem::UnknownUser))
            }
            other => other?,
        }
        Ok(Claimed {
            claim: Claim {
                id: ClaimId(tx.last_insert_id().unwrap_or(0)),
                coupon_id: coupon,
                code: c.code,
                claimed_at,
            },
            available_count: c.available_count - 1,
        })
    })
}

/// The user's claims, newest first, including claims of coupons deleted since.
pub fn history(pool: &Pool, user: UserId) -> Result<Vec<HistoryEntry>, Error> {
    with_conn(pool, |conn| {
        let exists: Option<u64> =
            conn.exec_first("SELECT id FROM users WHERE id = ?", (user.0,))?;
        if exists.is_none() {
            return Err(Error::Token(TokenProblem::UnknownUser));
        }
        let rows: Vec<(u64, u64, String, Timestamp)> = conn.exec(
            "SELECT cl.id, cl.coupon_id, co.code, cl.claimed_at
             FROM claims cl JOIN coupons co ON co.id = cl.coupon_id
             WHERE cl.user_id = ? ORDER BY cl.id DESC",
            (user.0,),
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, coupon_id, code, claimed_at)| HistoryEntry {
                claim_id: ClaimId(id),
                coupon_id: CouponId(coupon_id),
                code,
                claimed_at,
            })
            .collect())
    })
}
