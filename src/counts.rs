//! Each coupon's claims by status, kept beside the claims (`claim_counts`, see
//! `sql/012_claim_counts.sql`) by the transaction that changes them, so that a claim writes no
//! index over status and an admin's look at a coupon reads a few rows, not its every claim.

use crate::db::{padded, placeholders};
use crate::{ClaimId, ClaimStatus, CouponId, Error};
use mysql::prelude::Queryable;
use mysql::Value;
use std::collections::{BTreeMap, HashMap};

/// Slots a coupon's counts spread over, besides slot 0 (new claims').
const SLOTS: u64 = 8;

/// The kept statuses, in the table's column order; `claimed` is left to the invariant.
const KEPT: [ClaimStatus; 5] = [
    ClaimStatus::Held,
    ClaimStatus::Redeemed,
    ClaimStatus::Voided,
    ClaimStatus::Released,
    ClaimStatus::Expired,
];

/// Changes of a coupon's counts, in [`KEPT`]'s order.
type Deltas = [i64; 5];

/// The row new claims count in: they are made under their coupon's lock, one transaction at a
/// time for each coupon anyway.
pub(crate) const NEW_CLAIMS: u8 = 0;

/// The row a change to existing claims counts in, by the first claim's id: confirm lanes split
/// claims by id, so their batches write different rows and never wait for each other here.
pub(crate) fn slot_of(claim: ClaimId) -> u8 {
    1 + (claim.0 % SLOTS) as u8
}

/// Counts moves of claims between statuses (`from` is `None` for a new claim), in one
/// statement, in the caller's transaction. Rows are written in coupon order, so that two
/// transactions writing the same slot of several coupons cannot deadlock on them.
pub(crate) fn record(
    tx: &mut impl Queryable,
    slot: u8,
    moves: &[(CouponId, Option<ClaimStatus>, ClaimStatus)],
) -> Result<(), Error> {
    let column = |s: ClaimStatus| KEPT.iter().position(|&k| k == s);
    let mut by_coupon: BTreeMap<u64, Deltas> = BTreeMap::new();
    for &(coupon, from, to) in moves {
        let d = by_coupon.entry(coupon.0).or_default();
        if let Some(i) = from.and_then(column) {
            d[i] -= 1;
        }
        if let Some(i) = column(to) {
            d[i] += 1;
        }
    }
    by_coupon.retain(|_, d| d.iter().any(|&n| n != 0));
    if by_coupon.is_empty() {
        return Ok(());
    }
    // Padded to a power of two by repeating the last coupon with no change, so that a handful
    // of statements are prepared and cached.
    let mut rows: Vec<(u64, Deltas)> = by_coupon.into_iter().collect();
    let last = rows[rows.len() - 1].0;
    rows.resize(rows.len().next_power_of_two(), (last, [0; 5]));
    let sql = format!(
        "INSERT INTO claim_counts (coupon_id, slot, held, redeemed, voided, released, expired)
         VALUES {}
         ON DUPLICATE KEY UPDATE held = held + VALUES(held),
             redeemed = redeemed + VALUES(redeemed), voided = voided + VALUES(voided),
             released = released + VALUES(released), expired = expired + VALUES(expired)",
        placeholders(rows.len(), "(?, ?, ?, ?, ?, ?, ?)")
    );
    let params: Vec<Value> = rows
        .iter()
        .flat_map(|&(coupon, d)| {
            [Value::from(coupon), Value::from(slot)]
                .into_iter()
                .chain(d.map(Value::from))
        })
        .collect();
    tx.exec_drop(sql, params)?;
    Ok(())
}

/// Each coupon's kept counts (summed over its slots), by one plain read; coupons with none
/// are left out.
pub(crate) fn read(
    conn: &mut impl Queryable,
    coupons: &[CouponId],
) -> Result<HashMap<CouponId, HashMap<ClaimStatus, u64>>, Error> {
    if coupons.is_empty() {
        return Ok(HashMap::new());
    }
    let ids = padded(coupons.iter().map(|c| c.0).collect());
    let rows: Vec<(u64, i64, i64, i64, i64, i64)> = conn.exec(
        format!(
            "SELECT coupon_id, CAST(SUM(held) AS SIGNED), CAST(SUM(redeemed) AS SIGNED),
                 CAST(SUM(voided) AS SIGNED), CAST(SUM(released) AS SIGNED),
                 CAST(SUM(expired) AS SIGNED)
             FROM claim_counts WHERE coupon_id IN ({}) GROUP BY coupon_id",
            placeholders(ids.len(), "?")
        ),
        ids,
    )?;
    Ok(rows
        .into_iter()
        .map(|(coupon, h, r, v, rel, e)| {
            let counts = KEPT
                .into_iter()
                .zip([h, r, v, rel, e])
                .map(|(s, n)| (s, n.max(0) as u64))
                .collect();
            (CouponId(coupon), counts)
        })
        .collect())
}
