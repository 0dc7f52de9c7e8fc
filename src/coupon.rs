//! Coupons: create, change, delete, list. Stock only changes under the coupon row's lock.

use crate::db::{transaction, with_conn, Pool};
use crate::error::OnConstraint;
use crate::idempotency::{self, Answer, IdempotencyKey};
use crate::{CouponCode, CouponId, Error, Status, Stock, Timestamp, UserId};
use mysql::prelude::Queryable;
use serde::{Serialize, Serializer};

/// A coupon as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coupon {
    /// The coupon's id.
    pub id: CouponId,
    /// The code as the admin wrote it.
    pub code: String,
    /// Units left to claim.
    pub available_count: u64,
    /// Units ever made available: `available_count` plus the claims made.
    pub total_count: u64,
    /// ACTIVE or INACTIVE.
    #[serde(serialize_with = "status_str")]
    pub status: Status,
}

fn status_str<S: Serializer>(st: &Status, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(st.as_str())
}

/// What an admin gives to create a coupon.
#[derive(Debug, Clone)]
pub struct NewCoupon {
    /// The code, unique among live coupons.
    pub code: CouponCode,
    /// The initial stock, which is also the total.
    pub available_count: Stock,
    /// Whether it can be claimed.
    pub status: Status,
}

/// A change to a coupon; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CouponChange {
    /// A new code.
    pub code: Option<CouponCode>,
    /// Sets the remaining stock; `total_count` moves by the same amount.
    pub available_count: Option<Stock>,
    /// A new status.
    pub status: Option<Status>,
}

type CouponRow = (u64, String, i64, i64, String);
const COLUMNS: &str = "id, code, available_count, total_count, status";

fn from_row((id, code, available, total, status): CouponRow) -> Coupon {
    Coupon {
        id: CouponId(id),
        code,
        available_count: available.max(0) as u64,
        total_count: total.max(0) as u64,
        status: Status::parse(&status).unwrap_or(Status::Inactive),
    }
}

/// Creates a coupon whose total stock is its initial `available_count`.
pub fn create(pool: &Pool, new: &NewCoupon) -> Result<Coupon, Error> {
    with_conn(pool, |conn| insert(&mut **conn, new))
}

fn insert(conn: &mut impl Queryable, new: &NewCoupon) -> Result<Coupon, Error> {
    let now = Timestamp::now();
    let stock = new.available_count.get();
    let id = conn
        .exec_iter(
            "INSERT INTO coupons (code, available_count, total_count, status, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?)",
            (new.code.as_str(), stock, stock, new.status.as_str(), now, now),
        )
        .map(|r| r.last_insert_id().unwrap_or(0))
        .map_err(Error::from)
        .on_duplicate(Error::CodeTaken)?;
    Ok(Coupon {
        id: CouponId(id),
        code: new.code.as_str().to_owned(),
        available_count: stock.into(),
        total_count: stock.into(),
        status: new.status,
    })
}

/// [`create`] guarded by an idempotency key of the admin's: a retry with the same key gets the
/// same coupon (as it is now) or the same refusal, never a second coupon.
pub fn create_once(
    pool: &Pool,
    admin: UserId,
    new: &NewCoupon,
    key: &IdempotencyKey,
) -> Answer<Coupon> {
    let request = format!(
        "create {} {} {}",
        new.code.as_str(),
        new.available_count.get(),
        new.status.as_str()
    );
    let done = transaction(pool, |tx| {
        if let Some(first) = idempotency::reserve(tx, admin, key, &request)? {
            let result = match (first.outcome.as_str(), first.result_id) {
                ("created", Some(id)) => read(tx, CouponId(id), false)?
                    .ok_or_else(|| Error::Internal("recorded coupon is missing".into())),
                (outcome, _) => Err(Error::from_outcome(outcome)),
            };
            return Ok(Answer {
                result,
                replayed: true,
            });
        }
        let result = insert(tx, new);
        let (outcome, id) = match &result {
            Ok(c) => ("created", Some(c.id.0)),
            Err(e) => match e.outcome() {
                Some(name) => (name, None),
                None => return Err(result.err().unwrap_or(Error::Busy)),
            },
        };
        idempotency::record(tx, admin, key, outcome, id, None)?;
        Ok(Answer::new(result))
    });
    done.unwrap_or_else(|e| Answer::new(Err(e)))
}

/// Applies `change` under the coupon's row lock, so it never races with a claim.
pub fn update(pool: &Pool, id: CouponId, change: &CouponChange) -> Result<Coupon, Error> {
    transaction(pool, |tx| {
        let old = lock_live(tx, id)?.ok_or(Error::CouponNotFound)?;
        let available = change
            .available_count
            .map_or(old.available_count, |s| s.get().into());
        let new = Coupon {
            id,
            code: change
                .code
                .as_ref()
                .map_or(old.code.clone(), |c| c.as_str().to_owned()),
            available_count: available,
            // Claims so far stay counted: total = claims + remaining.
            total_count: old.total_count - old.available_count + available,
            status: change.status.unwrap_or(old.status),
        };
        tx.exec_drop(
            "UPDATE coupons SET code = ?, available_count = ?, total_count = ?, status = ?, updated_at = ?
             WHERE id = ?",
            (
                &new.code,
                new.available_count,
                new.total_count,
                new.status.as_str(),
                Timestamp::now(),
                id.0,
            ),
        )?;
        Ok(new)
    })
    .on_duplicate(Error::CodeTaken)
}

/// Soft-deletes a coupon: it leaves listings and can no longer be claimed; its claims stay.
pub fn delete(pool: &Pool, id: CouponId) -> Result<(), Error> {
    transaction(pool, |tx| {
        let now = Timestamp::now();
        tx.exec_drop(
            "UPDATE coupons SET deleted_at = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
            (now, now, id.0),
        )?;
        match tx.affected_rows() {
            0 => Err(Error::CouponNotFound),
            _ => Ok(()),
        }
    })
}

/// The coupon, unless it does not exist or was deleted.
pub fn get(pool: &Pool, id: CouponId) -> Result<Coupon, Error> {
    with_conn(pool, |conn| {
        read(&mut **conn, id, true)?.ok_or(Error::CouponNotFound)
    })
}

fn read(conn: &mut impl Queryable, id: CouponId, live_only: bool) -> Result<Option<Coupon>, Error> {
    let live = if live_only {
        " AND deleted_at IS NULL"
    } else {
        ""
    };
    let row: Option<CouponRow> = conn.exec_first(
        format!("SELECT {COLUMNS} FROM coupons WHERE id = ?{live}"),
        (id.0,),
    )?;
    Ok(row.map(from_row))
}

/// Active, not deleted coupons, oldest first (sold-out ones included, with 0 available).
pub fn list_active(pool: &Pool) -> Result<Vec<Coupon>, Error> {
    with_conn(pool, |conn| {
        let rows: Vec<CouponRow> = conn.query(format!(
            "SELECT {COLUMNS} FROM coupons WHERE status = 'ACTIVE' AND deleted_at IS NULL ORDER BY id"
        ))?;
        Ok(rows.into_iter().map(from_row).collect())
    })
}

/// Locks a live coupon's row until the transaction ends and reads it.
pub(crate) fn lock_live(tx: &mut impl Queryable, id: CouponId) -> Result<Option<Coupon>, Error> {
    let row: Option<CouponRow> = tx.exec_first(
        format!("SELECT {COLUMNS} FROM coupons WHERE id = ? AND deleted_at IS NULL FOR UPDATE"),
        (id.0,),
    )?;
    Ok(row.map(from_row))
}
