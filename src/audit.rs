//! The audit log: who created, changed or deleted a coupon, or voided a claim, when, and what
//! changed. Append-only; each entry is written in the transaction of the change it records.

use crate::db::{with_conn, Pool};
use crate::{ClaimId, CouponId, Error, Page, Timestamp, UserId};
use mysql::prelude::Queryable;
use serde::Serialize;

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// The entry's id.
    pub id: u64,
    /// The admin who acted (0: a program without a user).
    pub actor_id: UserId,
    /// `coupon.create`, `coupon.update`, `coupon.delete` or `claim.void`.
    pub action: String,
    /// The coupon concerned.
    pub coupon_id: Option<CouponId>,
    /// The claim concerned.
    pub claim_id: Option<ClaimId>,
    /// What changed.
    pub detail: serde_json::Value,
    /// When.
    pub created_at: Timestamp,
}

/// Appends an entry, in the caller's transaction.
pub(crate) fn record(
    tx: &mut impl Queryable,
    actor: UserId,
    action: &'static str,
    coupon: Option<CouponId>,
    claim: Option<ClaimId>,
    detail: &serde_json::Value,
) -> Result<(), Error> {
    record_many(tx, &[(actor, action, coupon, claim, detail.clone())])
}

/// An entry to append: actor, action, coupon, claim, detail.
pub(crate) type Pending = (
    UserId,
    &'static str,
    Option<CouponId>,
    Option<ClaimId>,
    serde_json::Value,
);

/// Appends entries (actor, action, coupon, claim, detail), in the caller's transaction, in
/// a few statements: chunks of 32, 16, ..., 1 rows, so that few statements are prepared.
pub(crate) fn record_many(tx: &mut impl Queryable, entries: &[Pending]) -> Result<(), Error> {
    let now = Timestamp::now();
    let mut rest = entries;
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(1 << rest.len().min(32).ilog2());
        let sql = format!(
            "INSERT INTO audit_log (actor_id, action, coupon_id, claim_id, detail, created_at)
             VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let params: Vec<mysql::Value> = chunk
            .iter()
            .flat_map(|(actor, action, coupon, claim, detail)| {
                [
                    actor.0.into(),
                    (*action).into(),
                    coupon.map(|c| c.0).into(),
                    claim.map(|c| c.0).into(),
                    detail.to_string().into(),
                    now.into(),
                ]
            })
            .collect();
        tx.exec_drop(sql, params)?;
        rest = more;
    }
    Ok(())
}

/// The log, newest first.
pub fn list(pool: &Pool, page: Page) -> Result<Vec<Entry>, Error> {
    with_conn(pool, |conn| {
        type Row = (
            u64,
            u64,
            String,
            Option<u64>,
            Option<u64>,
            String,
            Timestamp,
        );
        let rows: Vec<Row> = conn.exec(
            "SELECT id, actor_id, action, coupon_id, claim_id, detail, created_at FROM audit_log
             WHERE id < ? ORDER BY id DESC LIMIT ?",
            (page.after.unwrap_or(u64::MAX), page.limit),
        )?;
        Ok(rows
            .into_iter()
            .map(
                |(id, actor, action, coupon, claim, detail, created_at)| Entry {
                    id,
                    actor_id: UserId(actor),
                    action,
                    coupon_id: coupon.map(CouponId),
                    claim_id: claim.map(ClaimId),
                    detail: serde_json::from_str(&detail)
                        .unwrap_or(serde_json::Value::String(detail)),
                    created_at,
                },
            )
            .collect())
    })
}
