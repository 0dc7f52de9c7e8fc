//! Unique codes: a coupon's single-use codes, generated from a pattern or imported, each
//! handed to one live claim at a time. A coupon with codes has as many units as unassigned
//! codes: adding codes raises its stock, and the claim transaction (`claim.rs`, `decide`)
//! assigns one to each claim it grants, under the coupon's lock, in a constant number of
//! statements a batch; a claim that ends gives its code back (`life.rs`, `set_status`).
//!
//! Codes are unique case-insensitively among every coupon's codes (a unique key) and every
//! live coupon's own code. Both writers, an add of codes and a coupon's create or code change,
//! write their own table first and then read the other with a locking read: whichever comes
//! second either waits for the first and sees its code, or the two deadlock and the database
//! rolls one back (retried). Never both.

use crate::audit;
use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::random::Random;
use crate::{ClaimId, CouponCode, CouponId, Error, Page, UserId};
use mysql::prelude::Queryable;
use mysql::{Transaction, Value};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::Read;

/// The most codes one request generates or imports.
pub const MAX_PER_REQUEST: usize = 100_000;
/// Codes a statement inserts or checks: one multi-row INSERT, one `IN` list.
const CHUNK: usize = 1_000;
/// The default charset of a pattern's `#`: upper-case letters and digits without 0, O, 1, I.
pub const DEFAULT_CHARSET: &str = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Pattern spaces up to this size are enumerated (a bitset of the codes taken) when they are
/// more than half full, instead of drawn at random: no long search for the last free codes.
const ENUMERATE_UP_TO: u128 = 1 << 22;

/// A pattern: 1 to 64 of `A-Z a-z 0-9 - _`, with `#` standing for one character of the
/// charset; at least one `#`.
#[derive(Debug, Clone)]
pub struct Pattern(String);

impl Pattern {
    /// Refuses a pattern without `#`, over 64 characters, or with characters codes cannot have.
    pub fn parse(s: &str) -> Result<Pattern, Error> {
        let ok = (1..=64).contains(&s.len())
            && s.contains('#')
            && s.bytes()
                .all(|b| b == b'#' || b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::invalid(
                "pattern",
                "must be 1 to 64 of letters, digits, '-', '_' and '#', with at least one '#'",
            ));
        }
        Ok(Pattern(s.to_owned()))
    }

    fn slots(&self) -> u32 {
        self.0.bytes().filter(|&b| b == b'#').count() as u32
    }
}

/// The characters a `#` draws from: 2 to 64 code characters, distinct case-insensitively
/// (codes compare so).
#[derive(Debug, Clone)]
pub struct Charset(Vec<u8>);

impl Charset {
    /// Refuses repeats (in any case), other characters, or fewer than 2 or more than 64.
    pub fn parse(s: &str) -> Result<Charset, Error> {
        let mut seen = HashSet::new();
        let ok = (2..=64).contains(&s.len())
            && s.bytes().all(|b| {
                (b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && seen.insert(b.to_ascii_lowercase())
            });
        if !ok {
            return Err(Error::invalid(
                "charset",
                "must be 2 to 64 distinct (case-insensitively) letters, digits, '-' or '_'",
            ));
        }
        Ok(Charset(s.as_bytes().to_vec()))
    }

    fn position(&self, b: u8) -> Option<usize> {
        self.0.iter().position(|c| c.eq_ignore_ascii_case(&b))
    }
}

/// Codes to add to a coupon.
#[derive(Debug, Clone)]
pub enum NewCodes {
    /// `count` new codes drawn from `pattern`.
    Generate {
        /// 1 to [`MAX_PER_REQUEST`].
        count: usize,
        /// The pattern.
        pattern: Pattern,
        /// What each `#` draws from.
        charset: Charset,
    },
    /// These codes, as given.
    Import(Vec<CouponCode>),
}

impl NewCodes {
    /// `count` codes of `pattern` from `charset` ([`DEFAULT_CHARSET`] when `None`).
    pub fn generate(count: i64, pattern: &str, charset: Option<&str>) -> Result<NewCodes, Error> {
        let count = usize::try_from(count)
            .ok()
            .filter(|n| (1..=MAX_PER_REQUEST).contains(n))
            .ok_or_else(|| Error::invalid("count", "must be a whole number from 1 to 100000"))?;
        Ok(NewCodes::Generate {
            count,
            pattern: Pattern::parse(pattern)?,
            charset: Charset::parse(charset.unwrap_or(DEFAULT_CHARSET))?,
        })
    }

    /// These codes, 1 to [`MAX_PER_REQUEST`], each following the coupon code rules.
    pub fn import(codes: &[String]) -> Result<NewCodes, Error> {
        if codes.is_empty() || codes.len() > MAX_PER_REQUEST {
            return Err(Error::invalid("codes", "must hold 1 to 100000 codes"));
        }
        let codes = codes
            .iter()
            .map(|c| {
                CouponCode::parse(c).map_err(|_| {
                    Error::invalid(
                        "codes",
                        format!("{c:?} is not a code: 1 to 64 of letters, digits, '-' and '_'"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(NewCodes::Import(codes))
    }
}

/// What an add of codes did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Added {
    /// The coupon.
    pub coupon_id: CouponId,
    /// Codes added.
    pub added: u64,
    /// Its codes now.
    pub total_codes: u64,
    /// Its units left now: its unassigned codes.
    pub available_count: u64,
}

/// Adds codes to a live coupon, all or none, and raises its stock by as many. The codes are
/// inserted in chunks of multi-row INSERTs, in one transaction that locks the coupon's row only
/// at its end, to raise the counts: claims of the coupon (and of every other) go on meanwhile,
/// and see none of the new codes until the commit. An import with a code in use or given twice
/// is [`Error::CodeInUse`] naming the first, and adds nothing (the transaction rolls back);
/// a pattern without `count` free codes is [`Error::PatternExhausted`], before any insert.
/// A coupon that has plain stock (made without codes) is [`Error::StockFromCodes`]: create it
/// with `available_count` 0 to give it codes.
pub fn add(pool: &Pool, actor: UserId, coupon: CouponId, new: &NewCodes) -> Result<Added, Error> {
    transaction(pool, |tx| {
        let c = crate::coupon::read(tx, coupon, true)?.ok_or(Error::CouponNotFound)?;
        if c.code_count == 0 && c.total_count > 0 {
            return Err(Error::StockFromCodes);
        }
        // Adds to one coupon one at a time (not its row: its claims go on).
        tx.exec_drop(
            "INSERT INTO code_adds (coupon_id) VALUES (?) ON DUPLICATE KEY UPDATE coupon_id = coupon_id",
            (coupon.0,),
        )?;
        let added = match new {
            NewCodes::Import(codes) => import(tx, coupon, codes)?,
            NewCodes::Generate {
                count,
                pattern,
                charset,
            } => generate(tx, coupon, *count, pattern, charset)?,
        };
        // The only moment the coupon is locked: the codes become claimable with their units.
        // A locking read: the current row, not this transaction's snapshot.
        let locked: Option<(i64, i64, i64)> = tx.exec_first(
            "SELECT code_count, available_count, total_count FROM coupons
             WHERE id = ? AND deleted_at IS NULL FOR UPDATE",
            (coupon.0,),
        )?;
        let (codes, available, total) = locked.ok_or(Error::CouponNotFound)?;
        if codes == 0 && total > 0 {
            return Err(Error::StockFromCodes);
        }
        let n = added as i64;
        tx.exec_drop(
            "UPDATE coupons SET available_count = available_count + ?,
                 total_count = total_count + ?, code_count = code_count + ? WHERE id = ?",
            (n, n, n, coupon.0),
        )?;
        let (total, available) = ((codes + n) as u64, (available + n) as u64);
        audit::record(
            tx,
            actor,
            "coupon.codes",
            Some(coupon),
            None,
            &serde_json::json!({ "added": added }),
        )?;
        let added = Added {
            coupon_id: coupon,
            added,
            total_codes: total,
            available_count: available,
        };
        crate::events::record(tx, "codes.added", &added)?;
        Ok(added)
    })
}

/// Inserts the given codes, refusing the first one given twice or in use.
fn import(tx: &mut Transaction<'_>, coupon: CouponId, codes: &[CouponCode]) -> Result<u64, Error> {
    let mut seen = HashSet::with_capacity(codes.len());
    if let Some(twice) = codes
        .iter()
        .find(|c| !seen.insert(c.as_str().to_ascii_lowercase()))
    {
        return Err(Error::CodeInUse(twice.as_str().to_owned()));
    }
    for chunk in codes.chunks(CHUNK) {
        let chunk: Vec<&str> = chunk.iter().map(CouponCode::as_str).collect();
        let taken = taken(tx, &chunk)?;
        if let Some(first) = chunk
            .iter()
            .find(|c| taken.contains(&c.to_ascii_lowercase()))
        {
            return Err(Error::CodeInUse((*first).to_owned()));
        }
        insert(tx, coupon, &chunk)?;
    }
    Ok(codes.len() as u64)
}

/// Of `codes`, those in use (lower-cased): among the codes, or a live coupon's own code. A
/// locking read: a code not there stays free of the other writer until this transaction ends
/// (its gap is locked), and one being written is waited for.
fn taken(tx: &mut Transaction<'_>, codes: &[&str]) -> Result<HashSet<String>, Error> {
    let codes = padded(codes.to_vec());
    let list = placeholders(codes.len(), "?");
    let mut found: Vec<String> = tx.exec(
        format!("SELECT code FROM coupon_codes WHERE code IN ({list}) LOCK IN SHARE MODE"),
        codes.clone(),
    )?;
    found.extend(tx.exec::<String, _, _>(
        format!("SELECT live_code FROM coupons WHERE live_code IN ({list}) LOCK IN SHARE MODE"),
        codes,
    )?);
    Ok(found.into_iter().map(|c| c.to_ascii_lowercase()).collect())
}

/// Inserts codes of `coupon`, unassigned, in one statement.
fn insert(tx: &mut Transaction<'_>, coupon: CouponId, codes: &[&str]) -> Result<(), Error> {
    if codes.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO coupon_codes (coupon_id, code) VALUES {}",
        placeholders(codes.len(), "(?, ?)")
    );
    let params: Vec<Value> = codes
        .iter()
        .flat_map(|&c| [coupon.0.into(), c.into()])
        .collect();
    // A duplicate here would be a writer that skipped the locking read: still no double.
    tx.exec_drop(sql, params)
        .map_err(Error::from)
        .map_err(|e| match e.server_code() {
            Some(1062) => Error::CodeTaken,
            _ => e,
        })
}

/// Refuses `code` as a coupon's own code when it is one of the unique codes (the coupon's
/// row is written already: see the module's doc for the race this closes).
pub(crate) fn check_not_a_unique_code(conn: &mut impl Queryable, code: &str) -> Result<(), Error> {
    let found: Option<u64> = conn.exec_first(
        "SELECT id FROM coupon_codes WHERE code = ? LOCK IN SHARE MODE",
        (code,),
    )?;
    match found {
        Some(_) => Err(Error::CodeTaken),
        None => Ok(()),
    }
}

/// The code of `pattern` whose `#`s spell `index` in base `charset.len()`.
fn spell(pattern: &Pattern, charset: &Charset, mut index: u64) -> String {
    let base = charset.0.len() as u64;
    let mut out = pattern.0.clone().into_bytes();
    for b in out.iter_mut().rev().filter(|b| **b == b'#') {
        *b = charset.0[(index % base) as usize];
        index /= base;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The index of `code` in the pattern's space, if it is in it (case-insensitively).
fn index_of(pattern: &Pattern, charset: &Charset, code: &str) -> Option<u64> {
    if code.len() != pattern.0.len() {
        return None;
    }
    let base = charset.0.len() as u64;
    let mut index = 0u64;
    for (p, c) in pattern.0.bytes().zip(code.bytes()) {
        if p == b'#' {
            index = index * base + charset.position(c)? as u64;
        } else if !p.eq_ignore_ascii_case(&c) {
            return None;
        }
    }
    Some(index)
}

/// Generates and inserts `count` new codes of the pattern. The pattern's space, charset size
/// to the power of its `#`s, is compared with `count` and the codes in use first: when it
/// cannot give `count` new ones, [`Error::PatternExhausted`] before any insert. Codes are
/// drawn at random while the space stays at most half full; a fuller (small) space is
/// enumerated, so the last free codes are found without a search.
fn generate(
    tx: &mut Transaction<'_>,
    coupon: CouponId,
    count: usize,
    pattern: &Pattern,
    charset: &Charset,
) -> Result<u64, Error> {
    let space = (charset.0.len() as u128)
        .checked_pow(pattern.slots())
        .unwrap_or(u128::MAX);
    if count as u128 > space {
        return Err(Error::PatternExhausted);
    }
    // At most this many codes exist anywhere: every coupon's codes and own code.
    let (codes, coupons): (i64, i64) = tx
        .query_first("SELECT COALESCE(SUM(code_count), 0), COUNT(*) FROM coupons")?
        .unwrap_or((0, 0));
    let in_use_at_most = (codes.max(0) + coupons.max(0)) as u128;
    let mut random = Random::new()?;
    let mut free: Option<Vec<u64>> = None;
    if space < 2 * (count as u128 + in_use_at_most) {
        // Maybe full: count the codes in the space (a plain read; the inserts below check
        // each code again, locking).
        let like: String = pattern
            .0
            .chars()
            .map(|c| match c {
                '#' => "_".to_owned(),
                '_' => "\\_".to_owned(),
                c => c.to_string(),
            })
            .collect();
        let mut seen: Vec<u64> = Vec::new();
        let rows: Vec<String> = tx.exec(
            "SELECT code FROM coupon_codes WHERE code LIKE ?
             UNION ALL SELECT live_code FROM coupons WHERE live_code LIKE ?",
            (&like, &like),
        )?;
        for code in rows {
            if let Some(i) = index_of(pattern, charset, &code) {
                seen.push(i);
            }
        }
        seen.sort_unstable();
        seen.dedup();
        if space - (seen.len() as u128) < count as u128 {
            return Err(Error::PatternExhausted);
        }
        if space <= ENUMERATE_UP_TO && 2 * (seen.len() + count) as u128 > space {
            let mut left: Vec<u64> = (0..space as u64)
                .filter(|i| seen.binary_search(i).is_err())
                .collect();
            // Partial Fisher-Yates: `count` drawn without repeats, at the end of `left`.
            let n = left.len();
            for k in 0..n.min(count) {
                let j = random.below_u64((n - k) as u64)? as usize;
                left.swap(j, n - 1 - k);
            }
            free = Some(left);
        }
    }
    let mut drawn: HashSet<String> = HashSet::with_capacity(count);
    let mut added = 0usize;
    // Random draws give up after this many codes found taken: far beyond what a space at
    // most half full gives (expected: fewer than `count`).
    let mut misses_left = 64 * count + 1_000;
    while added < count {
        let want = (count - added).min(CHUNK);
        let mut chunk: Vec<String> = Vec::with_capacity(want);
        while chunk.len() < want {
            let code = match &mut free {
                Some(left) => match left.pop() {
                    Some(i) => spell(pattern, charset, i),
                    None => return Err(Error::PatternExhausted),
                },
                None => {
                    let mut code = pattern.0.clone().into_bytes();
                    for b in code.iter_mut().filter(|b| **b == b'#') {
                        *b = charset.0[random.below(charset.0.len())?];
                    }
                    String::from_utf8(code).unwrap_or_default()
                }
            };
            if drawn.insert(code.to_ascii_lowercase()) {
                chunk.push(code);
            }
        }
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let taken = taken(tx, &refs)?;
        let fresh: Vec<&str> = refs
            .into_iter()
            .filter(|c| !taken.contains(&c.to_ascii_lowercase()))
            .collect();
        misses_left = misses_left.saturating_sub(want - fresh.len());
        if misses_left == 0 {
            return Err(Error::PatternExhausted);
        }
        insert(tx, coupon, &fresh)?;
        added += fresh.len();
    }
    Ok(added as u64)
}

/// A unique code a claim names, as the claim transaction finds it under its coupon's lock.
#[derive(Debug, Clone)]
pub(crate) struct Named {
    pub id: u64,
    pub coupon: CouponId,
    /// As stored.
    pub code: String,
    /// Held by a live claim.
    pub used: bool,
}

/// The unique codes among `codes`, by lower-cased code, in one statement. A plain read after
/// the coupons' locks: every change of a code's claim is made under its coupon's lock.
pub(crate) fn named(
    tx: &mut Transaction<'_>,
    codes: &[&str],
) -> Result<HashMap<String, Named>, Error> {
    let codes = padded(codes.to_vec());
    let rows: Vec<(u64, u64, String, Option<u64>)> = tx.exec(
        format!(
            "SELECT id, coupon_id, code, claim_id FROM coupon_codes WHERE code IN ({})",
            placeholders(codes.len(), "?")
        ),
        codes,
    )?;
    Ok(rows
        .into_iter()
        .map(|(id, coupon, code, claim)| {
            let named = Named {
                id,
                coupon: CouponId(coupon),
                code: code.clone(),
                used: claim.is_some(),
            };
            (code.to_ascii_lowercase(), named)
        })
        .collect())
}

/// Where the handing out of a coupon's codes stands, read with the coupon under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// The highest id of its codes handed out so far: the fresh ones are above it.
    pub handed_out_to: u64,
    /// How many of its codes at or below the cursor came back, to be handed out first.
    pub returned: u64,
}

/// The codes a batch hands out of one coupon, and where that leaves its cursor.
#[derive(Debug, Default)]
pub(crate) struct Picked {
    /// (id, code), in order.
    pub codes: Vec<(u64, String)>,
    /// The cursor after them.
    pub cursor: u64,
    /// Of them, those that came back (rows of returned_codes).
    pub returned: Vec<u64>,
}

/// `n` unassigned codes of each coupon, skipping `given` (named by claims of the batch):
/// those that came back first, then fresh ones above the cursor, in id order. A statement for
/// each kind, for every coupon of the batch at once (the second again only if codes named
/// earlier, ahead of the cursor, used up its margin). Plain reads after the coupons' locks, as
/// [`named`]: they never wait for an add of codes in flight, whose rows they cannot see before
/// its commit, which raises the stock with them.
pub(crate) fn pick(
    tx: &mut Transaction<'_>,
    wants: &[(&crate::coupon::Coupon, u64)],
    given: &HashSet<u64>,
) -> Result<HashMap<CouponId, Picked>, Error> {
    let mut out: HashMap<CouponId, Picked> = wants
        .iter()
        .map(|(c, _)| {
            let p = Picked {
                cursor: c.cursor.handed_out_to,
                ..Picked::default()
            };
            (c.id, p)
        })
        .collect();
    let margin = given.len() as u64;
    let back: Vec<(CouponId, u64)> = wants
        .iter()
        .filter(|(c, _)| c.cursor.returned > 0)
        .map(|(c, n)| (c.id, n + margin))
        .collect();
    if !back.is_empty() {
        let sql = vec![
            "(SELECT r.coupon_id, r.code_id, cc.code FROM returned_codes r
              JOIN coupon_codes cc ON cc.id = r.code_id
              WHERE r.coupon_id = ? ORDER BY r.code_id LIMIT ?)";
            back.len()
        ]
        .join(" UNION ALL ");
        let params: Vec<Value> = back
            .iter()
            .flat_map(|&(c, n)| [c.0.into(), n.into()])
            .collect();
        let rows: Vec<(u64, u64, String)> = tx.exec(sql, params)?;
        for (coupon, id, code) in rows {
            let want = wants
                .iter()
                .find(|(c, _)| c.id.0 == coupon)
                .map_or(0, |w| w.1);
            let p = out.entry(CouponId(coupon)).or_default();
            if !given.contains(&id) && (p.codes.len() as u64) < want {
                p.codes.push((id, code));
                p.returned.push(id);
            }
        }
    }
    // Fresh codes, until each coupon has its `n` (the stock says they are there).
    loop {
        let short: Vec<(CouponId, u64, u64)> = wants
            .iter()
            .filter_map(|(c, n)| {
                let p = &out[&c.id];
                let need = n.saturating_sub(p.codes.len() as u64);
                (need > 0).then_some((c.id, p.cursor, need))
            })
            .collect();
        if short.is_empty() {
            return Ok(out);
        }
        let sql = vec![
            // Forced: MariaDB otherwise reads the coupon's codes from its first, by `ref`.
            "(SELECT coupon_id, id, code, claim_id FROM coupon_codes
              FORCE INDEX (coupon_codes_by_coupon)
              WHERE coupon_id = ? AND id > ? ORDER BY id LIMIT ?)";
            short.len()
        ]
        .join(" UNION ALL ");
        let params: Vec<Value> = short
            .iter()
            .flat_map(|&(c, after, need)| [c.0.into(), after.into(), (need + margin + 8).into()])
            .collect();
        let rows: Vec<(u64, u64, String, Option<u64>)> = tx.exec(sql, params)?;
        if rows.is_empty() {
            return Err(Error::Internal("fewer unassigned codes than units".into()));
        }
        let mut got: HashMap<u64, u64> = HashMap::new();
        for (coupon, id, code, claim) in rows {
            let need = short.iter().find(|s| s.0 .0 == coupon).map_or(0, |s| s.2);
            let n = got.entry(coupon).or_insert(0);
            let Some(p) = out.get_mut(&CouponId(coupon)).filter(|_| *n < need) else {
                continue;
            };
            // Codes assigned by name ahead of the cursor are passed over: given back, they
            // come back as returned ones.
            p.cursor = p.cursor.max(id);
            if claim.is_none() && !given.contains(&id) {
                p.codes.push((id, code));
                *n += 1;
            }
        }
    }
}

/// Moves each coupon's cursor and takes the returned codes handed out off its count and off
/// returned_codes: a statement each, for the whole batch.
pub(crate) fn advance(
    tx: &mut Transaction<'_>,
    moves: &[(CouponId, u64, u64)],
    returned: &[u64],
) -> Result<(), Error> {
    if !moves.is_empty() {
        let sql = format!(
            "UPDATE coupons SET code_cursor = CASE id {} END,
                 codes_returned = codes_returned - CASE id {} END
             WHERE id IN ({})",
            vec!["WHEN ? THEN ?"; moves.len()].join(" "),
            vec!["WHEN ? THEN ?"; moves.len()].join(" "),
            placeholders(moves.len(), "?")
        );
        let params: Vec<Value> = moves
            .iter()
            .flat_map(|&(c, cursor, _)| [c.0.into(), cursor.into()])
            .chain(moves.iter().flat_map(|&(c, _, n)| [c.0.into(), n.into()]))
            .chain(moves.iter().map(|&(c, _, _)| c.0.into()))
            .collect();
        tx.exec_drop(sql, params)?;
    }
    if !returned.is_empty() {
        let ids = padded(returned.to_vec());
        tx.exec_drop(
            format!(
                "DELETE FROM returned_codes WHERE code_id IN ({})",
                placeholders(ids.len(), "?")
            ),
            ids,
        )?;
    }
    Ok(())
}

/// Gives each code (by id) to its claim, in one statement; each must be unassigned.
pub(crate) fn assign(tx: &mut Transaction<'_>, pairs: &[(u64, ClaimId)]) -> Result<(), Error> {
    if pairs.is_empty() {
        return Ok(());
    }
    let n = pairs.len() as u64;
    // Padded to a power of two, as every batch statement: a few statement shapes to prepare.
    // A repeated pair changes nothing: CASE takes the first match, IN ignores repeats.
    let pairs = padded(pairs.to_vec());
    let sql = format!(
        "UPDATE coupon_codes SET claim_id = CASE id {} END
         WHERE id IN ({}) AND claim_id IS NULL",
        vec!["WHEN ? THEN ?"; pairs.len()].join(" "),
        placeholders(pairs.len(), "?")
    );
    let params: Vec<Value> = pairs
        .iter()
        .flat_map(|&(code, claim)| [code.into(), claim.0.into()])
        .chain(pairs.iter().map(|&(code, _)| code.into()))
        .collect();
    tx.exec_drop(sql, params)?;
    if tx.affected_rows() != n {
        return Err(Error::Internal(
            "a code to assign was assigned already".into(),
        ));
    }
    Ok(())
}

/// Gives an ended claim's code back, if it had one, under the coupon's lock (held by the
/// caller): unassigned again, and among the returned ones if the cursor has passed it. For a
/// claim without a code, one point look-up. Locking reads: the caller's snapshot may be older
/// than its lock.
pub(crate) fn give_back(tx: &mut Transaction<'_>, claim: ClaimId) -> Result<(), Error> {
    let row: Option<(u64, u64, u64)> = tx.exec_first(
        "SELECT cc.id, cc.coupon_id, co.code_cursor FROM claims cl
         JOIN coupon_codes cc ON cc.code = cl.assigned_code AND cc.claim_id = cl.id
         JOIN coupons co ON co.id = cc.coupon_id
         WHERE cl.id = ? FOR UPDATE",
        (claim.0,),
    )?;
    let Some((code, coupon, cursor)) = row else {
        return Ok(());
    };
    tx.exec_drop(
        "UPDATE coupon_codes SET claim_id = NULL WHERE id = ?",
        (code,),
    )?;
    if code <= cursor {
        tx.exec_drop(
            "INSERT INTO returned_codes (code_id, coupon_id) VALUES (?, ?)",
            (code, coupon),
        )?;
        tx.exec_drop(
            "UPDATE coupons SET codes_returned = codes_returned + 1 WHERE id = ?",
            (coupon,),
        )?;
    }
    Ok(())
}

/// Whether a code is held by a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeStatus {
    /// No claim holds it.
    Unassigned,
    /// A held, claimed or redeemed claim holds it.
    Assigned,
}

impl CodeStatus {
    /// `unassigned` or `assigned`.
    pub fn parse(s: &str) -> Result<CodeStatus, Error> {
        match s {
            "unassigned" => Ok(CodeStatus::Unassigned),
            "assigned" => Ok(CodeStatus::Assigned),
            _ => Err(Error::invalid("status", "must be unassigned or assigned")),
        }
    }
}

/// One of a coupon's codes, as admins see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Code {
    /// Its id, the cursor of the list.
    pub id: u64,
    /// The code.
    pub code: String,
    /// `unassigned` or `assigned`.
    pub status: &'static str,
    /// The claim holding it, when assigned.
    pub claim_id: Option<ClaimId>,
}

fn code_row((id, code, claim): (u64, String, Option<u64>)) -> Code {
    Code {
        id,
        code,
        status: if claim.is_some() {
            "assigned"
        } else {
            "unassigned"
        },
        claim_id: claim.map(ClaimId),
    }
}

/// A page of a coupon's codes (deleted coupons' too), oldest first.
pub fn list(
    pool: &Pool,
    coupon: CouponId,
    status: Option<CodeStatus>,
    page: Page,
) -> Result<Vec<Code>, Error> {
    with_conn(pool, |conn| {
        let exists: Option<u64> =
            conn.exec_first("SELECT id FROM coupons WHERE id = ?", (coupon.0,))?;
        exists.ok_or(Error::CouponNotFound)?;
        let filter = match status {
            None => "",
            Some(CodeStatus::Unassigned) => " AND claim_id IS NULL",
            Some(CodeStatus::Assigned) => " AND claim_id IS NOT NULL",
        };
        let rows: Vec<(u64, String, Option<u64>)> = conn.exec(
            format!(
                "SELECT id, code, claim_id FROM coupon_codes FORCE INDEX (coupon_codes_by_coupon)
                 WHERE coupon_id = ? AND id > ?{filter} ORDER BY id LIMIT ?"
            ),
            (coupon.0, page.after.unwrap_or(0), page.limit),
        )?;
        Ok(rows.into_iter().map(code_row).collect())
    })
}

/// Every code of a coupon (with `status`, if given) as CSV (`code,status,claim_id`), read a
/// page at a time as the reader is read: never all in memory. [`Error::CouponNotFound`] at
/// once for no such coupon.
pub fn csv(pool: &Pool, coupon: CouponId, status: Option<CodeStatus>) -> Result<CodesCsv, Error> {
    list(
        pool,
        coupon,
        None,
        Page {
            limit: 1,
            after: None,
        },
    )?;
    Ok(CodesCsv {
        pool: pool.clone(),
        coupon,
        status,
        after: Some(0),
        buf: b"code,status,claim_id\n".to_vec(),
        pos: 0,
    })
}

/// The reader [`csv`] gives.
pub struct CodesCsv {
    pool: Pool,
    coupon: CouponId,
    status: Option<CodeStatus>,
    /// The last id read; `None` once every page is read.
    after: Option<u64>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for CodesCsv {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            let Some(after) = self.after else {
                return Ok(0);
            };
            let page = Page {
                limit: 1000,
                after: Some(after),
            };
            let codes = list(&self.pool, self.coupon, self.status, page)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.after = codes.last().map(|c| c.id).filter(|_| codes.len() == 1000);
            self.buf.clear();
            self.pos = 0;
            for c in codes {
                let claim = c.claim_id.map(|id| id.0.to_string()).unwrap_or_default();
                self.buf
                    .extend_from_slice(format!("{},{},{claim}\n", c.code, c.status).as_bytes());
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spell_and_index_of_are_inverse_and_case_insensitive() {
        let p = Pattern::parse("A-##_#").unwrap();
        let cs = Charset::parse("XYZ").unwrap();
        for i in 0..27 {
            let code = spell(&p, &cs, i);
            assert_eq!(index_of(&p, &cs, &code), Some(i), "{code}");
            assert_eq!(index_of(&p, &cs, &code.to_ascii_lowercase()), Some(i));
        }
        assert_eq!(index_of(&p, &cs, "A-XXAX"), None, "a literal position");
        assert_eq!(index_of(&p, &cs, "A-XQ_X"), None, "outside the charset");
        assert!(Charset::parse("aA").is_err(), "the same in another case");
        assert!(Pattern::parse("NOHASH").is_err());
    }
}
