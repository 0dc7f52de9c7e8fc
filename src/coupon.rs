//! Coupons: create, change, delete, list. Stock only changes under the coupon row's lock.

use crate::audit;
use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::error::OnConstraint;
use crate::idempotency::{self, Answer, IdempotencyKey, RequestDigest};
use crate::{
    Amount, ClaimStatus, CouponCode, CouponId, Currency, Error, Label, Metadata, Page,
    PerUserLimit, PercentOff, Status, Stock, Timestamp, UserId,
};
use mysql::prelude::{FromValue, Queryable};
use serde::{Serialize, Serializer};
use std::collections::{BTreeMap, HashMap};

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
    /// Percent off an order, 1 to 100; never with `amount_off`.
    pub percent_off: Option<u32>,
    /// Minor units of `currency` off an order; never with `percent_off`.
    pub amount_off: Option<u64>,
    /// The currency of `amount_off` and `min_order_amount` (three upper-case letters).
    pub currency: Option<String>,
    /// The least order, in minor units of `currency`, the coupon applies to.
    pub min_order_amount: Option<u64>,
    /// The admin's own keys and values.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Counts admin changes (not claims); the HTTP layer's ETag.
    pub version: u32,
    /// How many unique codes it has ([`crate::codes`]); 0 for a plain coupon, whose claims
    /// read no codes. Then its stock is its unassigned codes.
    pub code_count: u64,
    /// Where the handing out of its codes stands (not shown).
    #[serde(skip)]
    pub cursor: crate::codes::Cursor,
}

/// The optional rules of a coupon: its name and description, a per-user limit, a validity
/// window, its value (its terms: a percentage or an amount off, a minimum order) and metadata.
/// The default is none of them, as the original service had.
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
    /// Percent off an order; never with `amount_off`.
    pub percent_off: Option<PercentOff>,
    /// An amount off an order; never with `percent_off`, and only with a `currency`.
    pub amount_off: Option<Amount>,
    /// The currency of the amounts.
    pub currency: Option<Currency>,
    /// The least order the coupon applies to; only with a `currency`.
    pub min_order_amount: Option<Amount>,
    /// The admin's own keys and values.
    pub metadata: Option<Metadata>,
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
    /// A new percentage off, or none; refused with [`Error::TermsLocked`] once the coupon has
    /// claims, as are changes to the three below but `metadata`.
    pub percent_off: Option<Option<PercentOff>>,
    /// A new amount off, or none.
    pub amount_off: Option<Option<Amount>>,
    /// A new currency, or none.
    pub currency: Option<Option<Currency>>,
    /// A new minimum order, or none.
    pub min_order_amount: Option<Option<Amount>>,
    /// New metadata, replacing the old whole, or none.
    pub metadata: Option<Option<Metadata>>,
}

impl RulesChange {
    /// The rules of a new coupon: a rule absent or `None` alike is not set.
    pub fn flatten(self) -> Rules {
        Rules {
            name: self.name.flatten(),
            description: self.description.flatten(),
            per_user_limit: self.per_user_limit.flatten(),
            starts_at: self.starts_at.flatten(),
            ends_at: self.ends_at.flatten(),
            percent_off: self.percent_off.flatten(),
            amount_off: self.amount_off.flatten(),
            currency: self.currency.flatten(),
            min_order_amount: self.min_order_amount.flatten(),
            metadata: self.metadata.flatten(),
        }
    }
}

fn check_window(starts_at: Option<Timestamp>, ends_at: Option<Timestamp>) -> Result<(), Error> {
    match (starts_at, ends_at) {
        (Some(s), Some(e)) if s >= e => Err(Error::invalid("ends_at", "must be after starts_at")),
        _ => Ok(()),
    }
}

/// A coupon's terms together: a percentage or an amount off, not both; amounts only with a
/// currency.
fn check_terms(c: &Coupon) -> Result<(), Error> {
    if c.percent_off.is_some() && c.amount_off.is_some() {
        return Err(Error::invalid(
            "value",
            "has both percent_off and amount_off; set the other to null",
        ));
    }
    if c.currency.is_none() && (c.amount_off.is_some() || c.min_order_amount.is_some()) {
        return Err(Error::invalid(
            "value",
            "needs a currency with amount_off or min_order_amount",
        ));
    }
    Ok(())
}

/// What the coupon is worth: what cannot change once it has claims.
fn terms(c: &Coupon) -> (Option<u32>, Option<u64>, Option<&str>, Option<u64>) {
    (
        c.percent_off,
        c.amount_off,
        c.currency.as_deref(),
        c.min_order_amount,
    )
}

/// The discount the coupon gives on an order of `order_amount` minor units: `percent_off`
/// percent of it, rounded down; or `amount_off`, at most the order; or 0 for a coupon without
/// value. Never more than the order, and no overflow whatever the numbers.
pub fn discount(c: &Coupon, order_amount: u64) -> u64 {
    let off = match (c.percent_off, c.amount_off) {
        (Some(percent), _) => u128::from(order_amount) * u128::from(percent) / 100,
        (None, Some(amount)) => amount.into(),
        (None, None) => 0,
    };
    // At most `order_amount`, so it fits.
    off.min(order_amount.into()) as u64
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

const COLUMNS: &str = "id, code, available_count, total_count, status, name, description, per_user_limit, starts_at, ends_at, version, percent_off, amount_off, currency, min_order_amount, metadata, code_count, code_cursor, codes_returned";

/// Column `name` of a row, converted.
fn take<T: FromValue>(row: &mut mysql::Row, name: &str) -> Result<T, Error> {
    row.take_opt(name)
        .ok_or_else(|| Error::Internal(format!("coupon row: no {name}")))?
        .map_err(|e| Error::Internal(format!("coupon row: {name}: {e}")))
}

/// A coupon from a row of `{COLUMNS}`.
fn from_row(mut row: mysql::Row) -> Result<Coupon, Error> {
    let row = &mut row;
    let status: String = take(row, "status")?;
    let metadata: Option<String> = take(row, "metadata")?;
    Ok(Coupon {
        id: CouponId(take(row, "id")?),
        code: take(row, "code")?,
        available_count: take::<i64>(row, "available_count")?.max(0) as u64,
        total_count: take::<i64>(row, "total_count")?.max(0) as u64,
        status: Status::parse(&status).unwrap_or(Status::Inactive),
        name: take(row, "name")?,
        description: take(row, "description")?,
        per_user_limit: take(row, "per_user_limit")?,
        starts_at: take(row, "starts_at")?,
        ends_at: take(row, "ends_at")?,
        percent_off: take(row, "percent_off")?,
        amount_off: take(row, "amount_off")?,
        currency: take(row, "currency")?,
        min_order_amount: take(row, "min_order_amount")?,
        metadata: metadata
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| Error::Internal(format!("coupon row: metadata: {e}")))?,
        version: take(row, "version")?,
        code_count: take::<i64>(row, "code_count")?.max(0) as u64,
        cursor: crate::codes::Cursor {
            handed_out_to: take(row, "code_cursor")?,
            returned: take::<i64>(row, "codes_returned")?.max(0) as u64,
        },
    })
}

/// The values of `percent_off, amount_off, currency, min_order_amount, metadata`, in that order.
fn value_params(c: &Coupon) -> [mysql::Value; 5] {
    [
        c.percent_off.into(),
        c.amount_off.into(),
        c.currency.clone().into(),
        c.min_order_amount.into(),
        c.metadata
            .as_ref()
            .map(|m| serde_json::json!(m).to_string())
            .into(),
    ]
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
        percent_off: r.percent_off.map(PercentOff::get),
        amount_off: r.amount_off.map(Amount::get),
        currency: r.currency.as_ref().map(|c| c.as_str().to_owned()),
        min_order_amount: r.min_order_amount.map(Amount::get),
        metadata: r.metadata.as_ref().map(|m| m.get().clone()),
        version: 1,
        code_count: 0,
        cursor: Default::default(),
    };
    check_terms(&c)?;
    let mut params: Vec<mysql::Value> = vec![
        c.code.as_str().into(),
        stock.into(),
        stock.into(),
        c.status.as_str().into(),
        c.name.clone().into(),
        c.description.clone().into(),
        c.per_user_limit.into(),
        c.starts_at.into(),
        c.ends_at.into(),
        now.into(),
        now.into(),
    ];
    params.extend(value_params(&c));
    let id = conn
        .exec_iter(
            "INSERT INTO coupons (code, available_count, total_count, status, name, description,
                 per_user_limit, starts_at, ends_at, created_at, updated_at,
                 percent_off, amount_off, currency, min_order_amount, metadata)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params,
        )
        .map(|r| r.last_insert_id().unwrap_or(0))
        .map_err(Error::from)
        .on_duplicate(Error::CodeTaken)?;
    crate::codes::check_not_a_unique_code(conn, &c.code)?;
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
    crate::events::record(conn, "coupon.created", &c)?;
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
    let request = RequestDigest::of(&create_text(new));
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
        // A refusal found after the insert (the code is one of a coupon's unique codes) is
        // recorded with the key and committed: the insert must not be.
        tx.query_drop("SAVEPOINT coupon_create")?;
        let result = insert(tx, admin, new);
        if result.is_err() {
            tx.query_drop("ROLLBACK TO SAVEPOINT coupon_create")?;
        }
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

/// The canonical text of a create, whose digest a key records. Without value or metadata, it is
/// the text keys recorded in full before they kept its digest (sql/006), so keys recorded
/// before value and metadata came still match their retries.
fn create_text(new: &NewCoupon) -> String {
    let r = &new.rules;
    let mut text = format!(
        "create {} {} {} Rules {{ name: {:?}, description: {:?}, per_user_limit: {:?}, starts_at: {:?}, ends_at: {:?} }}",
        new.code.as_str(),
        new.available_count.get(),
        new.status.as_str(),
        r.name,
        r.description,
        r.per_user_limit,
        r.starts_at,
        r.ends_at,
    );
    let value = (
        &r.percent_off,
        &r.amount_off,
        &r.currency,
        &r.min_order_amount,
        &r.metadata,
    );
    if value != (&None, &None, &None, &None, &None) {
        text.push_str(&format!(" value {value:?}"));
    }
    text
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
        if change.available_count.is_some() && old.code_count > 0 {
            return Err(Error::StockFromCodes);
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
            percent_off: r
                .percent_off
                .map_or(old.percent_off, |p| p.map(PercentOff::get)),
            amount_off: r.amount_off.map_or(old.amount_off, |a| a.map(Amount::get)),
            currency: r.currency.as_ref().map_or(old.currency.clone(), |c| {
                c.as_ref().map(|c| c.as_str().to_owned())
            }),
            min_order_amount: r
                .min_order_amount
                .map_or(old.min_order_amount, |a| a.map(Amount::get)),
            metadata: r.metadata.as_ref().map_or(old.metadata.clone(), |m| {
                m.as_ref().map(|m| m.get().clone())
            }),
            version: old.version + 1,
            code_count: old.code_count,
            cursor: old.cursor,
        };
        check_window(new.starts_at, new.ends_at)?;
        // The coupon as it would be: a field this change leaves keeps counting.
        check_terms(&new)?;
        if terms(&new) != terms(&old) && has_claims(tx, id)? {
            return Err(Error::TermsLocked);
        }
        if new.per_user_limit.is_some() && old.per_user_limit.is_none() {
            recount_per_user(tx, id)?;
        }
        let mut params: Vec<mysql::Value> = vec![
            new.code.as_str().into(),
            new.available_count.into(),
            new.total_count.into(),
            new.status.as_str().into(),
            new.name.clone().into(),
            new.description.clone().into(),
            new.per_user_limit.into(),
            new.starts_at.into(),
            new.ends_at.into(),
            Timestamp::now().into(),
        ];
        params.extend(value_params(&new));
        params.push(id.0.into());
        tx.exec_drop(
            "UPDATE coupons SET code = ?, available_count = ?, total_count = ?, status = ?,
                 name = ?, description = ?, per_user_limit = ?, starts_at = ?, ends_at = ?,
                 version = version + 1, updated_at = ?,
                 percent_off = ?, amount_off = ?, currency = ?, min_order_amount = ?, metadata = ?
             WHERE id = ?",
            params,
        )?;
        if new.code != old.code {
            crate::codes::check_not_a_unique_code(tx, &new.code)?;
        }
        audit::record(
            tx,
            actor,
            "coupon.update",
            Some(id),
            None,
            &changes(&old, &new),
        )?;
        crate::events::record(tx, "coupon.updated", &new)?;
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
        )?;
        let gone = read(tx, id, false)?.ok_or(Error::CouponNotFound)?;
        crate::events::record(tx, "coupon.deleted", &gone)
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

pub(crate) fn read(
    conn: &mut impl Queryable,
    id: CouponId,
    live_only: bool,
) -> Result<Option<Coupon>, Error> {
    let live = if live_only {
        " AND deleted_at IS NULL"
    } else {
        ""
    };
    let row: Option<mysql::Row> = conn.exec_first(
        format!("SELECT {COLUMNS} FROM coupons WHERE id = ?{live}"),
        (id.0,),
    )?;
    row.map(from_row).transpose()
}

/// The live coupon whose code is `code`, or the coupon that has `code` among its unique
/// codes ([`crate::codes`]), compared case-insensitively (what a customer types). Codes are
/// unique across both, so there is one at most.
pub fn id_for_code(pool: &Pool, code: &CouponCode) -> Result<CouponId, Error> {
    with_conn(pool, |conn| {
        let id: Option<u64> = conn.exec_first(
            "SELECT id FROM coupons WHERE live_code = ?
             UNION ALL SELECT coupon_id FROM coupon_codes WHERE code = ? LIMIT 1",
            (code.as_str(), code.as_str()),
        )?;
        id.map(CouponId).ok_or(Error::CouponNotFound)
    })
}

/// Claimable coupons (active, not deleted, inside their window), oldest first; sold-out ones
/// included, with 0 available.
pub fn list_active(pool: &Pool, page: Page) -> Result<Vec<Coupon>, Error> {
    let now = Timestamp::now();
    with_conn(pool, |conn| {
        let rows: Vec<mysql::Row> = conn.exec(
            format!(
                "SELECT {COLUMNS} FROM coupons WHERE status = 'ACTIVE' AND deleted_at IS NULL
                 AND (starts_at IS NULL OR starts_at <= ?) AND (ends_at IS NULL OR ends_at > ?)
                 AND id > ? ORDER BY id LIMIT ?"
            ),
            (now, now, page.after.unwrap_or(0), page.limit),
        )?;
        rows.into_iter().map(from_row).collect()
    })
}

/// A coupon as admins see it: also deleted ones, with how many claims it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminCoupon {
    /// The coupon.
    #[serde(flatten)]
    pub coupon: Coupon,
    /// Its claims by status.
    #[serde(flatten)]
    pub claims: StatusCounts,
    /// When it was deleted, if it was.
    pub deleted_at: Option<Timestamp>,
}

/// A coupon's claims by status. `held + claimed + redeemed == total_count - available_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StatusCounts {
    /// Held, not confirmed yet.
    pub held: u64,
    /// Claimed (or confirmed).
    pub claimed: u64,
    /// Redeemed against an order.
    pub redeemed: u64,
    /// Voided by an admin.
    pub voided: u64,
    /// Holds released.
    pub released: u64,
    /// Holds that ran out.
    pub expired: u64,
}

impl StatusCounts {
    fn add(&mut self, status: ClaimStatus, n: u64) {
        let count = match status {
            ClaimStatus::Held => &mut self.held,
            ClaimStatus::Claimed => &mut self.claimed,
            ClaimStatus::Redeemed => &mut self.redeemed,
            ClaimStatus::Voided => &mut self.voided,
            ClaimStatus::Released => &mut self.released,
            ClaimStatus::Expired => &mut self.expired,
        };
        *count += n;
    }
}

/// Each coupon's claims by status: the kept counts ([`crate::counts`]), and `claimed` from the
/// invariant (`held + claimed + redeemed == total_count - available_count`).
fn count_claims(conn: &mut impl Queryable, coupons: &mut [AdminCoupon]) -> Result<(), Error> {
    let ids: Vec<CouponId> = coupons.iter().map(|c| c.coupon.id).collect();
    let mut kept = crate::counts::read(conn, &ids)?;
    for c in coupons {
        for (status, n) in kept.remove(&c.coupon.id).unwrap_or_default() {
            c.claims.add(status, n);
        }
        let live = c
            .coupon
            .total_count
            .saturating_sub(c.coupon.available_count);
        c.claims.claimed = live.saturating_sub(c.claims.held + c.claims.redeemed);
    }
    Ok(())
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
    // One snapshot for the coupons and their counts, so that they agree.
    transaction(pool, |tx| {
        let rows: Vec<mysql::Row> = tx.exec(
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
        let mut coupons = rows
            .into_iter()
            .map(admin_row)
            .collect::<Result<Vec<_>, _>>()?;
        count_claims(tx, &mut coupons)?;
        Ok(coupons)
    })
}

/// A row of `{COLUMNS}, deleted_at`.
fn admin_row(mut row: mysql::Row) -> Result<AdminCoupon, Error> {
    let deleted_at = take(&mut row, "deleted_at")?;
    let coupon = from_row(row)?;
    Ok(AdminCoupon {
        coupon,
        claims: StatusCounts::default(),
        deleted_at,
    })
}

/// One coupon as admins see it, deleted or not.
pub fn admin_get(pool: &Pool, id: CouponId) -> Result<AdminCoupon, Error> {
    transaction(pool, |tx| {
        let row: Option<mysql::Row> = tx.exec_first(
            format!("SELECT {COLUMNS}, deleted_at FROM coupons WHERE id = ?"),
            (id.0,),
        )?;
        let mut coupon = [admin_row(row.ok_or(Error::CouponNotFound)?)?];
        count_claims(tx, &mut coupon)?;
        let [coupon] = coupon;
        Ok(coupon)
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
         SELECT user_id, coupon_id, COUNT(*) FROM claims
         WHERE coupon_id = ? AND status IN ('held', 'claimed', 'redeemed')
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
    let row: Option<mysql::Row> = tx.exec_first(
        format!("SELECT {COLUMNS} FROM coupons WHERE id = ? AND deleted_at IS NULL FOR UPDATE"),
        (id.0,),
    )?;
    row.map(from_row).transpose()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An active coupon without rules or value, 3 of 10 left: the unit tests' coupon.
    pub(crate) fn example() -> Coupon {
        Coupon {
            id: CouponId(1),
            code: "WELCOME".into(),
            available_count: 3,
            total_count: 10,
            status: Status::Active,
            name: None,
            description: None,
            per_user_limit: None,
            starts_at: None,
            ends_at: None,
            percent_off: None,
            amount_off: None,
            currency: None,
            min_order_amount: None,
            metadata: None,
            version: 1,
            code_count: 0,
            cursor: Default::default(),
        }
    }

    /// A coupon worth `percent_off` or `amount_off` (EUR).
    fn worth(percent_off: Option<u32>, amount_off: Option<u64>) -> Coupon {
        Coupon {
            percent_off,
            amount_off,
            currency: amount_off.map(|_| "EUR".into()),
            ..example()
        }
    }

    #[test]
    fn discounts_round_down_stay_within_the_order_and_never_overflow() {
        #[track_caller]
        fn check(percent_off: Option<u32>, amount_off: Option<u64>, order: u64, want: u64) {
            let got = discount(&worth(percent_off, amount_off), order);
            assert_eq!(
                got, want,
                "percent_off {percent_off:?}, amount_off {amount_off:?}, order {order}"
            );
        }
        let max = u64::MAX;
        let cases: &[(Option<u32>, Option<u64>, u64, u64)] = &[
            // No value: nothing off.
            (None, None, 12_000, 0),
            (None, None, 0, 0),
            // A percentage, rounded down.
            (Some(10), None, 12_000, 1_200),
            (Some(10), None, 12_345, 1_234),
            (Some(15), None, 999, 149),
            (Some(1), None, 99, 0),
            (Some(1), None, 100, 1),
            (Some(33), None, 1, 0),
            (Some(100), None, 12_345, 12_345),
            (Some(50), None, 0, 0),
            // No overflow where order x percent is past u64.
            (Some(100), None, max, max),
            (Some(50), None, max, max / 2),
            (Some(99), None, max, (u128::from(max) * 99 / 100) as u64),
            // An amount, at most the order.
            (None, Some(500), 12_000, 500),
            (None, Some(500), 500, 500),
            (None, Some(500), 499, 499),
            (None, Some(500), 0, 0),
            (None, Some(max), max, max),
            (None, Some(Amount::MAX as u64), 10, 10),
            // Never more than the order, even from numbers the checks would refuse.
            (Some(250), None, 1_000, 1_000),
        ];
        for &(percent_off, amount_off, order, want) in cases {
            check(percent_off, amount_off, order, want);
        }
    }

    #[test]
    fn terms_need_one_value_and_a_currency_for_amounts() {
        let both = Coupon {
            percent_off: Some(10),
            ..worth(None, Some(500))
        };
        let no_currency = Coupon {
            currency: None,
            ..worth(None, Some(500))
        };
        let minimum_only = Coupon {
            min_order_amount: Some(0),
            ..worth(Some(10), None)
        };
        for bad in [both, no_currency, minimum_only] {
            let got = check_terms(&bad);
            assert!(
                matches!(got, Err(Error::Invalid { field: "value", .. })),
                "{bad:?}: {got:?}"
            );
        }
        let percent_in_a_currency = Coupon {
            currency: Some("USD".into()),
            min_order_amount: Some(5_000),
            ..worth(Some(10), None)
        };
        for good in [
            worth(None, None),
            worth(Some(10), None),
            worth(None, Some(500)),
            percent_in_a_currency,
        ] {
            assert!(check_terms(&good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_create_without_value_digests_as_before_and_with_one_differently() {
        let mut new = NewCoupon {
            code: CouponCode::parse("WELCOME").unwrap(),
            available_count: Stock::parse(5).unwrap(),
            status: Status::Active,
            rules: Rules::default(),
        };
        // The text keys recorded before value and metadata came (the derived Debug of the
        // old `Rules`), so their retries still match.
        assert_eq!(
            create_text(&new),
            "create WELCOME 5 ACTIVE Rules { name: None, description: None, per_user_limit: None, \
             starts_at: None, ends_at: None }"
        );
        let plain = create_text(&new);
        new.rules.percent_off = Some(PercentOff::parse(10).unwrap());
        let ten = create_text(&new);
        new.rules.percent_off = Some(PercentOff::parse(20).unwrap());
        let twenty = create_text(&new);
        new.rules.percent_off = None;
        new.rules.metadata = Some(Metadata::parse(&serde_json::json!({"a": "b"})).unwrap());
        let tagged = create_text(&new);
        let texts = [&plain, &ten, &twenty, &tagged];
        for (i, a) in texts.iter().enumerate() {
            for b in &texts[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
