//! Coupons: create, change, delete, list. Stock only changes under the coupon row's lock.

use crate::audit;
use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::error::OnConstraint;
use crate::idempotency::{self, Answer, IdempotencyKey, RequestDigest};
use crate::{
    CouponCode, CouponId, Error, Label, Page, PerUserLimit, Status, Stock, Timestamp, UserId,
};
use mysql::prelude::Queryable;
use serde::{Serialize, Serializer};
use std::collections::HashMap;

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
    /// A name for people, if given.
    pub name: Option<String>,
    /// A description for people, if given.
    pub description: Option<String>,
    /// Most claims one user may hold; `None`: no limit.
    pub per_user_limit: Option<u32>,
    /// Claimable from (inclusive); `None`: always was.
    pub starts_at: Option<Timestamp>,
    /// Claimable until (exclusive); `None`: no end.
    pub ends_at: Option<Timestamp>,
    /// Counts admin changes (not claims); the HTTP layer's ETag.
    pub version: u32,
}

/// The optional rules of a coupon: its name and description, a per-user limit, a validity
/// window. The default is none of them, as the original service had.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// A name for people, up to 200 characters.
    pub name: Option<Label>,
    /// A description for people, up to 2,000 characters.
    pub description: Option<Label>,
    /// Most claims one user may hold.
    pub per_user_limit: Option<PerUserLimit>,
    /// Claimable from (inclusive).
    pub starts_at: Option<Timestamp>,
    /// Claimable until (exclusive); must be after `starts_at`.
    pub ends_at: Option<Timestamp>,
}

/// A change to a coupon's rules: `None` leaves a rule as it is, `Some(None)` removes it.
#[derive(Debug, Clone, Default)]
pub struct RulesChange {
    /// A new name, or none.
    pub name: Option<Option<Label>>,
    /// A new description, or none.
    pub description: Option<Option<Label>>,
    /// A new per-user limit, or none.
    pub per_user_limit: Option<Option<PerUserLimit>>,
    /// A new start, or none.
    pub starts_at: Option<Option<Timestamp>>,
    /// A new end, or none.
    pub ends_at: Option<Option<Timestamp>>,
}

fn check_window(starts_at: Option<Timestamp>, ends_at: Option<Timestamp>) -> Result<(), Error> {
    match (starts_at, ends_at) {
        (Some(s), Some(e)) if s >= e => Err(Error::invalid("ends_at", "must be after starts_at")),
        _ => Ok(()),
    }
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
    /// Name, description, per-user limit, validity window.
    pub rules: Rules,
}

/// A change to a coupon; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CouponChange {
    /// A new code; refused with [`Error::CodeLocked`] once the coupon has claims.
    pub code: Option<CouponCode>,
    /// Sets the remaining stock; `total_count` moves by the same amount.
    pub available_count: Option<Stock>,
    /// A new status.
    pub status: Option<Status>,
    /// Changes to the rules.
    pub rules: RulesChange,
    /// Apply only if the coupon is still at this version, else [`Error::Stale`] (If-Match).
    pub if_version: Option<u32>,
}

type CouponRow = (
    u64,
    String,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<u32>,
    Option<Timestamp>,
    Option<Timestamp>,
    u32,
);
const COLUMNS: &str = "id, code, available_count, total_count, status, name, description, per_user_limit, starts_at, ends_at, version";

fn from_row(row: CouponRow) -> Coupon {
    let (
        id,
        code,
        available,
        total,
        status,
        name,
        description,
        per_user_limit,
        starts_at,
        ends_at,
        version,
    ) = row;
    Coupon {
        id: CouponId(id),
        code,
        available_count: available.max(0) as u64,
        total_count: total.max(0) as u64,
        status: Status::parse(&status).unwrap_or(Status::Inactive),
        name,
        description,
        per_user_limit,
        starts_at,
        ends_at,
        version,
    }
}

/// Creates a coupon whose total stock is its initial `available_count`; `actor` is the admin
/// the audit log names.
pub fn create(pool: &Pool, actor: UserId, new: &NewCoupon) -> Result<Coupon, Error> {
    transaction(pool, |tx| insert(tx, actor, new))
}

fn insert(conn: &mut impl Queryable, actor: UserId, new: &NewCoupon) -> Result<Coupon, Error> {
    let r = &new.rules;
    check_window(r.starts_at, r.ends_at)?;
    let now = Timestamp::now();
    let stock = new.available_count.get();
    let label = |l: &Option<Label>| l.as_ref().map(|l| l.as_str().to_owned());
    let c = Coupon {
        id: CouponId(0),
        code: new.code.as_str().to_owned(),
        available_count: stock.into(),
        total_count: stock.into(),
        status: new.status,
        name: label(&r.name),
        description: label(&r.description),
        per_user_limit: r.per_user_limit.map(PerUserLimit::get),
        starts_at: r.starts_at,
        ends_at: r.ends_at,
        version: 1,
    };
    let id = conn
        .exec_iter(
            "INSERT INTO coupons (code, available_count, total_count, status, name, description,
                 per_user_limit, starts_at, ends_at, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                &c.code,
                stock,
                stock,
                c.status.as_str(),
                &c.name,
                &c.description,
                c.per_user_limit,
                c.starts_at,
                c.ends_at,
                now,
                now,
            ),
        )
        .map(|r| r.last_insert_id().unwrap_or(0))
        .map_err(Error::from)
        .on_duplicate(Error::CodeTaken)?;
    let c = Coupon {
        id: CouponId(id),
        ..c
    };
    audit::record(
        conn,
        actor,
        "coupon.create",
        Some(c.id),
        None,
        &serde_json::json!(c),
    )?;
    Ok(c)
}

/// [`create`] guarded by an idempotency key of the admin's: a retry with the same key gets the
/// same coupon (as it is now) or the same refusal, never a second coupon.
pub fn create_once(
    pool: &Pool,
    admin: UserId,
    new: &NewCoupon,
    key: &IdempotencyKey,
) -> Answer<Coupon> {
    // The canonical text as keys recorded it in full before they kept its digest (sql/006).
    let request = RequestDigest::of(&format!(
        "create {} {} {} {:?}",
        new.code.as_str(),
        new.available_count.get(),
        new.status.as_str(),
        new.rules
    ));
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
        let result = insert(tx, admin, new);
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

/// Applies `change` under the coupon's row lock, so it never races with a claim; `actor` is the
/// admin the audit log names, with what changed.
pub fn update(
    pool: &Pool,
    actor: UserId,
    id: CouponId,
    change: &CouponChange,
) -> Result<Coupon, Error> {
    transaction(pool, |tx| {
        let old = lock_live(tx, id)?.ok_or(Error::CouponNotFound)?;
        if change.if_version.is_some_and(|v| v != old.version) {
            return Err(Error::Stale);
        }
        let code = change.code.as_ref().map(|c| c.as_str().to_owned());
        if code.as_ref().is_some_and(|c| *c != old.code) && has_claims(tx, id)? {
            return Err(Error::CodeLocked);
        }
        let available = change
            .available_count
            .map_or(old.available_count, |s| s.get().into());
        let r = &change.rules;
        let label = |l: &Option<Label>| l.as_ref().map(|l| l.as_str().to_owned());
        let new = Coupon {
            id,
            code: code.unwrap_or(old.code.clone()),
            available_count: available,
            // Claims so far stay counted: total = claims + remaining.
            total_count: old.total_count - old.available_count + available,
            status: change.status.unwrap_or(old.status),
            name: r.name.as_ref().map_or(old.name.clone(), label),
            description: r
                .description
                .as_ref()
                .map_or(old.description.clone(), label),
            per_user_limit: r
                .per_user_limit
                .map_or(old.per_user_limit, |l| l.map(PerUserLimit::get)),
            starts_at: r.starts_at.unwrap_or(old.starts_at),
            ends_at: r.ends_at.unwrap_or(old.ends_at),
            version: old.version + 1,
        };
        check_window(new.starts_at, new.ends_at)?;
        if new.per_user_limit.is_some() && old.per_user_limit.is_none() {
            recount_per_user(tx, id)?;
        }
        tx.exec_drop(
            "UPDATE coupons SET code = ?, available_count = ?, total_count = ?, status = ?,
                 name = ?, description = ?, per_user_limit = ?, starts_at = ?, ends_at = ?,
                 version = version + 1, updated_at = ?
             WHERE id = ?",
            (
                &new.code,
                new.available_count,
                new.total_count,
                new.status.as_str(),
                &new.name,
                &new.description,
                new.per_user_limit,
                new.starts_at,
                new.ends_at,
                Timestamp::now(),
                id.0,
            ),
        )?;
        audit::record(
            tx,
            actor,
            "coupon.update",
            Some(id),
            None,
            &changes(&old, &new),
        )?;
        Ok(new)
    })
    .on_duplicate(Error::CodeTaken)
}

/// Soft-deletes a coupon: it leaves listings and can no longer be claimed; its claims stay.
pub fn delete(pool: &Pool, actor: UserId, id: CouponId) -> Result<(), Error> {
    transaction(pool, |tx| {
        let now = Timestamp::now();
        tx.exec_drop(
            "UPDATE coupons SET deleted_at = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
            (now, now, id.0),
        )?;
        if tx.affected_rows() == 0 {
            return Err(Error::CouponNotFound);
        }
        audit::record(
            tx,
            actor,
            "coupon.delete",
            Some(id),
            None,
            &serde_json::json!({}),
        )
    })
}

/// `{"field": [old, new]}` for each field that differs.
fn changes(old: &Coupon, new: &Coupon) -> serde_json::Value {
    let (a, b) = (serde_json::json!(old), serde_json::json!(new));
    let mut out = serde_json::Map::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, v) in b {
            if k != "version" && a.get(k) != Some(v) {
                out.insert(k.clone(), serde_json::json!([a.get(k), v]));
            }
        }
    }
    serde_json::Value::Object(out)
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

/// Claimable coupons (active, not deleted, inside their window), oldest first; sold-out ones
/// included, with 0 available.
pub fn list_active(pool: &Pool, page: Page) -> Result<Vec<Coupon>, Error> {
    let now = Timestamp::now();
    with_conn(pool, |conn| {
        let rows: Vec<CouponRow> = conn.exec(
            format!(
                "SELECT {COLUMNS} FROM coupons WHERE status = 'ACTIVE' AND deleted_at IS NULL
                 AND (starts_at IS NULL OR starts_at <= ?) AND (ends_at IS NULL OR ends_at > ?)
                 AND id > ? ORDER BY id LIMIT ?"
            ),
            (now, now, page.after.unwrap_or(0), page.limit),
        )?;
        Ok(rows.into_iter().map(from_row).collect())
    })
}

/// A coupon as admins see it: also deleted ones, with how many claims it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminCoupon {
    /// The coupon.
    #[serde(flatten)]
    pub coupon: Coupon,
    /// Claims not voided: `total_count - available_count`.
    pub claimed: u64,
    /// When it was deleted, if it was.
    pub deleted_at: Option<Timestamp>,
}

/// What `GET /admin/coupons` may filter on.
#[derive(Debug, Clone, Default)]
pub struct AdminFilter {
    /// Only coupons with this status.
    pub status: Option<Status>,
    /// Only coupons whose code starts with this (case-insensitively).
    pub code_prefix: Option<String>,
}

/// Every coupon, deleted and inactive ones too, oldest first.
pub fn admin_list(
    pool: &Pool,
    filter: &AdminFilter,
    page: Page,
) -> Result<Vec<AdminCoupon>, Error> {
    let prefix = filter.code_prefix.clone().unwrap_or_default();
    // No code starts with a character codes cannot have; and the code column's ASCII collation
    // cannot even be compared with other text (a 500, once).
    if CouponCode::parse(&prefix).is_err() && !prefix.is_empty() {
        return Ok(Vec::new());
    }
    let status = filter.status.map(Status::as_str);
    with_conn(pool, |conn| {
        let rows: Vec<mysql::Row> = conn.exec(
            format!(
                "SELECT {COLUMNS}, deleted_at FROM coupons
                 WHERE (? IS NULL OR status = ?) AND LEFT(code, CHAR_LENGTH(?)) = ?
                   AND id > ? ORDER BY id LIMIT ?"
            ),
            (
                status,
                status,
                &prefix,
                &prefix,
                page.after.unwrap_or(0),
                page.limit,
            ),
        )?;
        rows.into_iter().map(admin_row).collect()
    })
}

/// A row of `{COLUMNS}, deleted_at`.
fn admin_row(row: mysql::Row) -> Result<AdminCoupon, Error> {
    let bad = |e: mysql::FromRowError| Error::Internal(format!("coupon row: {e}"));
    type AdminRow = (
        u64,
        String,
        i64,
        i64,
        String,
        Option<String>,
        Option<String>,
        Option<u32>,
        Option<Timestamp>,
        Option<Timestamp>,
        u32,
        Option<Timestamp>,
    );
    let (id, code, av, tot, st, name, desc, limit, starts, ends, version, deleted_at): AdminRow =
        mysql::from_row_opt(row).map_err(bad)?;
    let coupon = from_row((
        id, code, av, tot, st, name, desc, limit, starts, ends, version,
    ));
    Ok(AdminCoupon {
        claimed: coupon.total_count - coupon.available_count,
        coupon,
        deleted_at,
    })
}

/// One coupon as admins see it, deleted or not.
pub fn admin_get(pool: &Pool, id: CouponId) -> Result<AdminCoupon, Error> {
    with_conn(pool, |conn| {
        let row: Option<mysql::Row> = conn.exec_first(
            format!("SELECT {COLUMNS}, deleted_at FROM coupons WHERE id = ?"),
            (id.0,),
        )?;
        admin_row(row.ok_or(Error::CouponNotFound)?)
    })
}

/// Of `coupons`, those whose per-user limit `user` has reached.
pub fn limits_reached(
    pool: &Pool,
    user: UserId,
    coupons: &[Coupon],
) -> Result<Vec<CouponId>, Error> {
    if !coupons.iter().any(|c| c.per_user_limit.is_some()) {
        return Ok(Vec::new());
    }
    with_conn(pool, |conn| {
        let rows: Vec<(u64, u64)> = conn.exec(
            "SELECT coupon_id, claimed FROM user_coupon_claims WHERE user_id = ?",
            (user.0,),
        )?;
        Ok(coupons
            .iter()
            .filter(|c| {
                let held = rows.iter().find(|(id, _)| *id == c.id.0).map_or(0, |r| r.1);
                crate::claim::limit_reached(c, held)
            })
            .map(|c| c.id)
            .collect())
    })
}

/// Rebuilds the per-user counters of a coupon from its claims. Claims made while it had no
/// limit were not counted; a limit set now must count them. Runs under the coupon's row lock,
/// so no claim comes between.
fn recount_per_user(tx: &mut impl Queryable, id: CouponId) -> Result<(), Error> {
    tx.exec_drop(
        "DELETE FROM user_coupon_claims WHERE coupon_id = ?",
        (id.0,),
    )?;
    tx.exec_drop(
        "INSERT INTO user_coupon_claims (user_id, coupon_id, claimed)
         SELECT user_id, coupon_id, COUNT(*) FROM claims WHERE coupon_id = ? AND voided_at IS NULL
         GROUP BY user_id, coupon_id",
        (id.0,),
    )?;
    Ok(())
}

fn has_claims(tx: &mut impl Queryable, id: CouponId) -> Result<bool, Error> {
    let any: Option<u8> =
        tx.exec_first("SELECT 1 FROM claims WHERE coupon_id = ? LIMIT 1", (id.0,))?;
    Ok(any.is_some())
}

/// Whether a lock waits for a row another transaction holds, or skips that row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lock {
    Wait,
    Skip,
}

/// Locks the rows of `ids` until the transaction ends, in id order (two transactions locking
/// some of the same coupons cannot deadlock on them), and reads them: `Some` a live coupon,
/// `None` a deleted one. Ids with no row are left out, and with [`Lock::Skip`] so are rows
/// another transaction holds.
pub(crate) fn lock_many(
    tx: &mut impl Queryable,
    ids: impl Iterator<Item = CouponId>,
    lock: Lock,
) -> Result<HashMap<CouponId, Option<Coupon>>, Error> {
    let mut ids: Vec<u64> = ids.map(|c| c.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let ids = padded(ids);
    // By the primary key, so that only these rows are locked, whatever the optimizer thinks.
    let sql = format!(
        "SELECT {COLUMNS}, deleted_at FROM coupons FORCE INDEX (PRIMARY)
         WHERE id IN ({}) ORDER BY id FOR UPDATE{}",
        placeholders(ids.len(), "?"),
        if lock == Lock::Skip {
            " SKIP LOCKED"
        } else {
            ""
        }
    );
    let rows: Vec<mysql::Row> = tx.exec(sql, ids)?;
    rows.into_iter()
        .map(|row| {
            let a = admin_row(row)?;
            Ok((a.coupon.id, a.deleted_at.is_none().then_some(a.coupon)))
        })
        .collect()
}

/// Of `ids`, those that have a row (live or deleted), by a plain read.
pub(crate) fn existing(
    tx: &mut impl Queryable,
    ids: impl Iterator<Item = CouponId>,
) -> Result<std::collections::HashSet<CouponId>, Error> {
    let mut ids: Vec<u64> = ids.map(|c| c.0).collect();
    if ids.is_empty() {
        return Ok(Default::default());
    }
    ids.sort_unstable();
    ids.dedup();
    let ids = padded(ids);
    let sql = format!(
        "SELECT id FROM coupons WHERE id IN ({})",
        placeholders(ids.len(), "?")
    );
    let found: Vec<u64> = tx.exec(sql, ids)?;
    Ok(found.into_iter().map(CouponId).collect())
}

/// Locks a live coupon's row until the transaction ends and reads it.
fn lock_live(tx: &mut impl Queryable, id: CouponId) -> Result<Option<Coupon>, Error> {
    let row: Option<CouponRow> = tx.exec_first(
        format!("SELECT {COLUMNS} FROM coupons WHERE id = ? AND deleted_at IS NULL FOR UPDATE"),
        (id.0,),
    )?;
    Ok(row.map(from_row))
}
