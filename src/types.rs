//! Newtypes that parse: a value of one of these types has already been checked, so the
//! functions that take them never see raw, unchecked input.

use crate::Error;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use time::format_description::well_known::Rfc3339;
use time::macros::utc_datetime;
use time::{OffsetDateTime, PlainDateTime, SignedDuration, UtcDateTime};
use unicode_normalization::UnicodeNormalization;

/// An email address, normalised so that one address is one account however it is spelt:
/// trimmed, NFKC (a fullwidth `ａ` is `a`; a decomposed `e` + U+0301 is the one `é`), then
/// lower-cased, so that `Ada@X.org` and `ada@x.org` are one account too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Accepts `local@domain.tld` of at most 254 bytes once normalised, with no spaces, no
    /// control characters and no format characters (Unicode's Cf: zero-width spaces and
    /// joiners, direction marks, soft hyphens), which would make look-alike accounts.
    pub fn parse(s: &str) -> Result<Email, Error> {
        let s = s.trim().nfkc().collect::<String>().to_lowercase();
        let bad = |why: &str| Err(Error::invalid("email", why));
        if s.is_empty() || s.len() > 254 {
            return bad("must be 1 to 254 bytes");
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("must not contain spaces or control characters");
        }
        if s.chars().any(is_format) {
            return bad("must not contain invisible characters such as zero-width spaces");
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return bad("must look like name@example.com");
        };
        let labels_ok = domain
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-'));
        if local.is_empty() || local.len() > 64 || !domain.contains('.') || !labels_ok {
            return bad("must look like name@example.com");
        }
        Ok(Email(s))
    }

    /// The normalised address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `c` is a format character (Unicode's general category Cf, as of Unicode 15.1):
/// invisible, so two addresses differing by one look alike. The table is Cf's 21 ranges; the
/// standard library has no general category, and a crate for 21 ranges is not worth it.
fn is_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// A password of 8 to 72 bytes. bcrypt ignores everything after 72 bytes, so longer ones are
/// refused rather than silently truncated. `Debug` never prints it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Checks the length in bytes (not characters), since bcrypt counts bytes.
    pub fn parse(s: &str) -> Result<Password, Error> {
        if !(8..=72).contains(&s.len()) {
            return Err(Error::invalid("password", "must be 8 to 72 bytes long"));
        }
        Ok(Password(s.to_owned()))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A coupon code: 1 to 64 of `A-Z a-z 0-9 - _`. Kept as written; unique case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponCode(String);

impl CouponCode {
    /// Refuses empty, over-long, or codes with other characters.
    pub fn parse(s: &str) -> Result<CouponCode, Error> {
        if s.is_empty() || s.len() > 64 {
            return Err(Error::invalid("code", "must be 1 to 64 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::invalid(
                "code",
                "may contain only letters, digits, '-' and '_'",
            ));
        }
        Ok(CouponCode(s.to_owned()))
    }

    /// The code as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stock level: a whole number from 0 to 1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock(u32);

impl Stock {
    /// The largest stock a coupon can be given at once.
    pub const MAX: i64 = 1_000_000_000;

    /// Refuses negative numbers and anything above [`Stock::MAX`].
    pub fn parse(n: i64) -> Result<Stock, Error> {
        if !(0..=Stock::MAX).contains(&n) {
            return Err(Error::invalid(
                "available_count",
                format!("must be a whole number from 0 to {}", Stock::MAX),
            ));
        }
        Ok(Stock(n as u32))
    }

    /// The number of units.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A per-user claim limit: 1 to 1,000,000 claims of one coupon per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerUserLimit(u32);

impl PerUserLimit {
    /// Refuses anything outside 1 to 1,000,000.
    pub fn parse(n: i64) -> Result<PerUserLimit, Error> {
        if !(1..=1_000_000).contains(&n) {
            return Err(Error::invalid(
                "per_user_limit",
                "must be a whole number from 1 to 1000000",
            ));
        }
        Ok(PerUserLimit(n as u32))
    }

    /// The number of claims.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Text for people (a coupon's name or description): no control characters, at most `max`
/// characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label(String);

impl Label {
    /// Refuses control characters and text over `max` characters.
    pub fn parse(field: &'static str, s: &str, max: usize) -> Result<Label, Error> {
        if s.chars().count() > max {
            return Err(Error::invalid(
                field,
                format!("must be at most {max} characters"),
            ));
        }
        if s.chars().any(|c| c.is_control() && c != '\n') {
            return Err(Error::invalid(field, "must not contain control characters"));
        }
        Ok(Label(s.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A percentage off an order: a whole number from 1 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PercentOff(u32);

impl PercentOff {
    /// Refuses anything outside 1 to 100.
    pub fn parse(n: i64) -> Result<PercentOff, Error> {
        if !(1..=100).contains(&n) {
            return Err(Error::invalid(
                "percent_off",
                "must be a whole number from 1 to 100",
            ));
        }
        Ok(PercentOff(n as u32))
    }

    /// The percentage.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// An amount of money in minor units of a currency (cents for EUR), from 0 to [`Amount::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(u64);

impl Amount {
    /// The largest amount: 10^12 minor units, ten billion euros. Far above any order, yet an
    /// amount times 100 (a percentage) and the sum of a million amounts still fit in an `i64`,
    /// and every amount is exact as a JSON number in any client (below 2^53).
    pub const MAX: i64 = 1_000_000_000_000;

    /// An amount off an order (`amount_off`): 1 to [`Amount::MAX`].
    pub fn off(n: i64) -> Result<Amount, Error> {
        Amount::parse("amount_off", n, 1)
    }

    /// The least order a coupon applies to (`min_order_amount`): 0 to [`Amount::MAX`].
    pub fn min_order(n: i64) -> Result<Amount, Error> {
        Amount::parse("min_order_amount", n, 0)
    }

    fn parse(field: &'static str, n: i64, least: i64) -> Result<Amount, Error> {
        if !(least..=Amount::MAX).contains(&n) {
            return Err(Error::invalid(
                field,
                format!(
                    "must be a whole number of minor units from {least} to {}",
                    Amount::MAX
                ),
            ));
        }
        Ok(Amount(n as u64))
    }

    /// The amount in minor units.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// A currency: three upper-case letters, the shape of an ISO 4217 code (`EUR`, `USD`). Whether
/// the code is assigned is the shop's business, not checked here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(String);

impl Currency {
    /// Refuses anything but three letters `A` to `Z`.
    pub fn parse(s: &str) -> Result<Currency, Error> {
        if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::invalid(
                "currency",
                "must be three upper-case letters (ISO 4217), such as EUR",
            ));
        }
        Ok(Currency(s.to_owned()))
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A coupon's metadata: the admin's own string keys and values, kept and shown as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// The most keys.
    pub const MAX_KEYS: usize = 50;
    /// The longest key, in characters.
    pub const MAX_KEY_CHARS: usize = 40;
    /// The longest value, in characters.
    pub const MAX_VALUE_CHARS: usize = 500;
    /// The most bytes of its JSON text (what the `TEXT` column holds); only reached by keys and
    /// values mostly of 3- and 4-byte characters.
    pub const MAX_JSON_BYTES: usize = 65_535;

    /// Accepts a JSON object of at most 50 keys of 1 to 40 characters, each with a string of at
    /// most 500 characters.
    pub fn parse(v: &serde_json::Value) -> Result<Metadata, Error> {
        let bad = |why: String| Err(Error::invalid("metadata", why));
        let Some(object) = v.as_object() else {
            return bad("must be an object of strings".into());
        };
        if object.len() > Metadata::MAX_KEYS {
            return bad(format!("must have at most {} keys", Metadata::MAX_KEYS));
        }
        let mut map = BTreeMap::new();
        for (key, value) in object {
            if !(1..=Metadata::MAX_KEY_CHARS).contains(&key.chars().count()) {
                return bad(format!(
                    "keys must be 1 to {} characters",
                    Metadata::MAX_KEY_CHARS
                ));
            }
            let Some(value) = value.as_str() else {
                return bad(format!("{key:?} must be a string"));
            };
            if value.chars().count() > Metadata::MAX_VALUE_CHARS {
                return bad(format!(
                    "values must be at most {} characters",
                    Metadata::MAX_VALUE_CHARS
                ));
            }
            map.insert(key.clone(), value.to_owned());
        }
        let m = Metadata(map);
        if m.to_json().len() > Metadata::MAX_JSON_BYTES {
            return bad(format!(
                "must be at most {} bytes as JSON",
                Metadata::MAX_JSON_BYTES
            ));
        }
        Ok(m)
    }

    /// The keys and values.
    pub fn get(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// The JSON text the database keeps.
    pub(crate) fn to_json(&self) -> String {
        serde_json::json!(self.0).to_string()
    }
}

/// One page of a list, in id order: at most `limit` items after the cursor `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Items on the page, 1 to 1,000.
    pub limit: u32,
    /// The id the previous page ended at; `None` for the first page.
    pub after: Option<u64>,
}

impl Page {
    /// The default page size.
    pub const DEFAULT: u32 = 100;

    /// A page of `limit` items (default 100, at most 1,000) after the cursor `after` (a
    /// previous page's last id, as the `Link` header gives it).
    pub fn parse(limit: Option<&str>, after: Option<&str>) -> Result<Page, Error> {
        let limit = match limit {
            None => Page::DEFAULT,
            Some(l) => l
                .parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| Error::invalid("limit", "must be a whole number from 1 to 1000"))?,
        };
        let after = after
            .map(|a| {
                a.parse::<u64>()
                    .map_err(|_| Error::invalid("after", "is not a cursor from a Link header"))
            })
            .transpose()?;
        Ok(Page { limit, after })
    }

    /// The first page of the default size.
    pub fn first() -> Page {
        Page {
            limit: Page::DEFAULT,
            after: None,
        }
    }
}

/// Whether a coupon can be claimed at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Listed and claimable.
    Active,
    /// Hidden from the listing; claims are refused with [`Error::Inactive`].
    Inactive,
}

impl Status {
    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Inactive => "INACTIVE",
        }
    }

    /// Accepts `ACTIVE` or `INACTIVE`, in any case.
    pub fn parse(s: &str) -> Result<Status, Error> {
        match s.to_ascii_uppercase().as_str() {
            "ACTIVE" => Ok(Status::Active),
            "INACTIVE" => Ok(Status::Inactive),
            _ => Err(Error::invalid("status", "must be ACTIVE or INACTIVE")),
        }
    }
}

/// What a user may do: claim coupons, or also manage them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Lists and claims coupons.
    User,
    /// Also creates, updates and deletes coupons.
    Admin,
}

impl Role {
    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "USER",
            Role::Admin => "ADMIN",
        }
    }

    pub(crate) fn from_db(s: &str) -> Role {
        if s == "ADMIN" {
            Role::Admin
        } else {
            Role::User
        }
    }
}

/// Where a claim is in its life. A claim is made `Held` (with an end) or `Claimed`; a hold
/// becomes `Claimed` when confirmed, or `Released` or `Expired`, giving its unit back; a held
/// or claimed claim becomes `Redeemed` against an order; an admin may void any of the three
/// (`Voided`, the unit back). The three live ones hold a unit of stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimStatus {
    /// Taken from the stock until its `expires_at`, waiting to be confirmed.
    Held,
    /// Granted.
    Claimed,
    /// Used against an order.
    Redeemed,
    /// A hold its owner (or an admin) let go.
    Released,
    /// A hold that ran out.
    Expired,
    /// Cancelled by an admin.
    Voided,
}

impl ClaimStatus {
    /// Every status, in the order of its life.
    pub const ALL: [ClaimStatus; 6] = [
        ClaimStatus::Held,
        ClaimStatus::Claimed,
        ClaimStatus::Redeemed,
        ClaimStatus::Released,
        ClaimStatus::Expired,
        ClaimStatus::Voided,
    ];

    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimStatus::Held => "held",
            ClaimStatus::Claimed => "claimed",
            ClaimStatus::Redeemed => "redeemed",
            ClaimStatus::Released => "released",
            ClaimStatus::Expired => "expired",
            ClaimStatus::Voided => "voided",
        }
    }

    /// Whether a claim in this status holds a unit of stock (and counts toward a per-user
    /// limit).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            ClaimStatus::Held | ClaimStatus::Claimed | ClaimStatus::Redeemed
        )
    }

    pub(crate) fn from_db(s: &str) -> Result<ClaimStatus, Error> {
        ClaimStatus::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| Error::Internal(format!("unknown claim status {s:?}")))
    }
}

impl Serialize for ClaimStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How long a hold lasts: 1 second to 1 day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldSeconds(u32);

impl HoldSeconds {
    /// The longest hold.
    pub const MAX: i64 = 86_400;

    /// Refuses anything outside 1 to [`HoldSeconds::MAX`].
    pub fn parse(n: i64) -> Result<HoldSeconds, Error> {
        if !(1..=HoldSeconds::MAX).contains(&n) {
            return Err(Error::invalid(
                "hold_seconds",
                format!("must be a whole number from 1 to {}", HoldSeconds::MAX),
            ));
        }
        Ok(HoldSeconds(n as u32))
    }

    /// The seconds.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The hold's length.
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0.into())
    }
}

/// A shop's order id, as redemption records it: 1 to 64 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderId(String);

impl OrderId {
    /// Refuses anything but 1 to 64 printable ASCII characters (space included).
    pub fn parse(s: &str) -> Result<OrderId, Error> {
        if !(1..=64).contains(&s.len()) || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(Error::invalid(
                "order_id",
                "must be 1 to 64 printable ASCII characters",
            ));
        }
        Ok(OrderId(s.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $not_found:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl FromStr for $name {
            type Err = Error;
            /// Only plain decimal digits name a row; anything else names nothing (not found).
            fn from_str(s: &str) -> Result<Self, Error> {
                match s.parse::<u64>() {
                    Ok(n) if n > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok($name(n)),
                    _ => Err($not_found),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u64(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A user's id.
    UserId,
    Error::UserNotFound
);
id_type!(
    /// A coupon's id.
    CouponId,
    Error::CouponNotFound
);
id_type!(
    /// A claim's id.
    ClaimId,
    Error::ClaimNotFound
);

/// A UTC instant with microsecond precision in the years 0001 to 9999 (what a `DATETIME(6)`
/// column holds), stored as `DATETIME(6)` in UTC and shown as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(UtcDateTime);

impl Timestamp {
    /// The earliest instant a timestamp can hold.
    const MIN: Timestamp = Timestamp(utc_datetime!(0001-01-01 00:00:00));
    /// The latest instant a timestamp can hold.
    const MAX: Timestamp = Timestamp(utc_datetime!(9999-12-31 23:59:59.999999));

    /// `t` cut to whole microseconds, if it falls in the years 0001 to 9999.
    fn from_utc(t: UtcDateTime) -> Option<Timestamp> {
        (1..=9999)
            .contains(&t.year())
            .then(|| Timestamp(t.truncate_to_microsecond()))
    }

    /// The current time, from the service's clock (never the database session's time zone).
    pub fn now() -> Timestamp {
        Timestamp::from_utc(UtcDateTime::now()).unwrap_or(Timestamp::MIN)
    }

    /// This instant, `d` later (at most 9999-12-31T23:59:59.999999Z).
    pub fn plus(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(micros(d))).min(Timestamp::MAX)
    }

    /// This instant, `d` earlier (at least 0001-01-01T00:00:00Z).
    pub fn minus(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(micros(d))).max(Timestamp::MIN)
    }

    /// Parses RFC 3339 (`2026-12-01T00:00:00Z`, `2026-12-01T09:30:00.5+01:00`) into UTC. Any
    /// offset from -23:59 to +23:59 and any number of fractional digits (cut to microseconds)
    /// are accepted, as long as the time in UTC falls in the years 0001 to 9999.
    pub fn parse(field: &'static str, s: &str) -> Result<Timestamp, Error> {
        Timestamp::parse_rfc3339(s.trim()).ok_or_else(|| {
            Error::invalid(
                field,
                "must be an RFC 3339 time such as 2026-12-01T00:00:00Z",
            )
        })
    }

    fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        // `time` takes any one byte between the date and the time; RFC 3339 names `T` (or `t`)
        // and lets applications use a space.
        if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
            return None;
        }
        let local = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        Timestamp::from_utc(local.checked_to_utc()?)
    }

    /// Seconds since the Unix epoch.
    pub fn unix_secs(self) -> i64 {
        self.0.unix_timestamp()
    }

    /// The same instant as a date and time without an offset, as `DATETIME` columns hold it.
    fn plain(self) -> PlainDateTime {
        PlainDateTime::new(self.0.date(), self.0.time())
    }
}

/// `d` in whole microseconds, as `time` counts it (saturating: no timestamp is that far away).
fn micros(d: std::time::Duration) -> SignedDuration {
    SignedDuration::microseconds(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl From<Timestamp> for mysql::Value {
    fn from(t: Timestamp) -> mysql::Value {
        t.plain().into()
    }
}

impl mysql::prelude::FromValue for Timestamp {
    type Intermediate = Timestamp;
}

impl TryFrom<mysql::Value> for Timestamp {
    type Error = mysql::FromValueError;
    /// Reads a `DATETIME` as UTC; a zero date, or a year outside 0001 to 9999, is an error.
    fn try_from(v: mysql::Value) -> Result<Timestamp, mysql::FromValueError> {
        let plain: PlainDateTime = mysql::prelude::FromValue::from_value_opt(v)?;
        Timestamp::from_utc(plain.as_utc())
            .ok_or_else(|| mysql::FromValueError(mysql::Value::from(plain)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` as the field `starts_at` and checks the UTC time it gives, or with `None`
    /// that it is refused as an invalid `starts_at`. What it gives must read back unchanged from
    /// its own display.
    #[track_caller]
    fn check(input: &str, want: Option<&str>) {
        match (Timestamp::parse("starts_at", input), want) {
            (Ok(t), Some(want)) => {
                assert_eq!(t.to_string(), want, "{input:?}");
                let again = Timestamp::parse("starts_at", &t.to_string());
                assert_eq!(again.ok(), Some(t), "{input:?} does not round-trip");
            }
            (Err(Error::Invalid { field, .. }), None) => assert_eq!(field, "starts_at"),
            (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn rfc3339_times_parse_to_utc() {
        let cases: &[(&str, Option<&str>)] = &[
            // The plain cases; fractions are cut (never rounded) to microseconds.
            ("2026-12-01T00:00:00Z", Some("2026-12-01T00:00:00.000000Z")),
            (
                "2026-12-01T09:30:00.5+01:00",
                Some("2026-12-01T08:30:00.500000Z"),
            ),
            (
                "2024-02-29T23:59:59.123456789-02:30",
                Some("2024-03-01T02:29:59.123456Z"),
            ),
            (
                "2000-02-29T00:00:00.123456Z",
                Some("2000-02-29T00:00:00.123456Z"),
            ),
            (
                "2026-12-01T00:00:00.9999999999999Z",
                Some("2026-12-01T00:00:00.999999Z"),
            ),
            (
                " 2026-12-01T00:00:00Z\n",
                Some("2026-12-01T00:00:00.000000Z"),
            ),
            // RFC 3339 5.6: `t` and `z` may be lower case, and a space may separate date and time.
            ("2026-12-01t09:30:00z", Some("2026-12-01T09:30:00.000000Z")),
            (
                "2026-12-01 09:30:00+01:00",
                Some("2026-12-01T08:30:00.000000Z"),
            ),
            // Before 1970.
            (
                "1969-12-31T23:59:59.999999Z",
                Some("1969-12-31T23:59:59.999999Z"),
            ),
            (
                "1970-01-01T00:30:00+01:00",
                Some("1969-12-31T23:30:00.000000Z"),
            ),
            (
                "1900-02-28T12:00:00-05:00",
                Some("1900-02-28T17:00:00.000000Z"),
            ),
            ("1600-02-29T00:00:00Z", Some("1600-02-29T00:00:00.000000Z")),
            // Offsets, the widest RFC 3339 allows among them; -00:00 is UTC.
            (
                "2026-06-15T12:00:00+14:00",
                Some("2026-06-14T22:00:00.000000Z"),
            ),
            (
                "2026-06-15T12:00:00-12:00",
                Some("2026-06-16T00:00:00.000000Z"),
            ),
            (
                "2026-06-15T12:00:00+23:59",
                Some("2026-06-14T12:01:00.000000Z"),
            ),
            (
                "2026-06-15T12:00:00-23:59",
                Some("2026-06-16T11:59:00.000000Z"),
            ),
            (
                "2026-06-15T12:00:00-00:00",
                Some("2026-06-15T12:00:00.000000Z"),
            ),
            // The edges: years 0001 to 9999 in UTC, whatever the local year.
            ("0001-01-01T00:00:00Z", Some("0001-01-01T00:00:00.000000Z")),
            (
                "9999-12-31T23:59:59.999999Z",
                Some("9999-12-31T23:59:59.999999Z"),
            ),
            (
                "0000-12-31T23:00:00-01:00",
                Some("0001-01-01T00:00:00.000000Z"),
            ),
            (
                "0001-01-01T23:59:59+23:59",
                Some("0001-01-01T00:00:59.000000Z"),
            ),
            (
                "9999-12-31T23:59:59+23:59",
                Some("9999-12-31T00:00:59.000000Z"),
            ),
            (
                "9999-12-31T00:00:00-23:59",
                Some("9999-12-31T23:59:00.000000Z"),
            ),
            ("0000-01-01T00:00:00Z", None),
            ("0000-12-31T23:59:59.999999Z", None),
            ("0001-01-01T00:00:00+00:01", None),
            ("0001-01-01T00:00:00+23:59", None),
            ("9999-12-31T23:59:59-23:59", None),
            ("9999-12-31T23:59:59.999999-00:01", None),
            ("10000-01-01T00:00:00Z", None),
            ("-0001-01-01T00:00:00Z", None),
            ("+2026-12-01T00:00:00Z", None),
            // A leap second (RFC 3339 allows one at the end of a month, UTC) is the last
            // microsecond before it; anywhere else it is refused.
            ("2016-12-31T23:59:60Z", Some("2016-12-31T23:59:59.999999Z")),
            (
                "2016-12-31T20:59:60-03:00",
                Some("2016-12-31T23:59:59.999999Z"),
            ),
            ("2026-12-01T23:59:60Z", None),
            ("9999-12-31T23:59:60Z", Some("9999-12-31T23:59:59.999999Z")),
            // Bad offsets.
            ("2026-12-01T00:00:00+1\u{e9}00", None),
            ("2026-12-01T00:00:00+1\u{e9}:00", None),
            ("2026-12-01T00:00:00+01:0\u{e9}", None),
            ("2026-12-01T00:00:00+24:00", None),
            ("2026-12-01T00:00:00-24:00", None),
            ("2026-12-01T00:00:00+01:60", None),
            ("2026-12-01T00:00:00+0100", None),
            ("2026-12-01T00:00:00+01", None),
            ("2026-12-01T00:00:00+01:00:00", None),
            ("2026-12-01T00:00:00", None),
            ("2026-12-01T00:00:00 UTC", None),
            // Bad dates and times.
            ("2026-13-01T00:00:00Z", None),
            ("2026-00-01T00:00:00Z", None),
            ("2026-12-00T00:00:00Z", None),
            ("2026-02-30T00:00:00Z", None),
            ("2025-02-29T00:00:00Z", None),
            ("1900-02-29T00:00:00Z", None),
            ("2026-12-01T24:00:00Z", None),
            ("2026-12-01T23:60:00Z", None),
            ("2026-12-01T00:00:61Z", None),
            ("2026-1-01T00:00:00Z", None),
            ("2026-12-01T0:00:00Z", None),
            // Garbage.
            ("", None),
            ("   ", None),
            ("2026-12-01", None),
            ("tomorrow", None),
            ("x026-12-01T00:00:00Z", None),
            ("2026-12-01X00:00:00Z", None),
            ("2026-12-01_00:00:00Z", None),
            ("2026-12-01\u{e9}00:00:00Z", None),
            ("2026-12-01TT00:00:00Z", None),
            ("2026-12-01T00:00:00.Z", None),
            ("2026-12-01T00:00:00,5Z", None),
            ("2026-12-01T00:00:00.1a2Z", None),
            ("2026-12-01T00:00:00Zjunk", None),
            ("2026-12-01T00:00:00ZZ", None),
            ("\u{ff12}\u{ff10}\u{ff12}\u{ff16}-12-01T00:00:00Z", None),
            ("2026-12-01T00:00:00\u{0}Z", None),
            ("1\u{e9}", None),
        ];
        for &(input, want) in cases {
            check(input, want);
        }
    }

    #[test]
    fn no_input_near_a_valid_time_panics() {
        let seeds = [
            "2026-12-01T09:30:00.5+01:00",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00Z",
            "2016-12-31T23:59:60Z",
        ];
        let swaps = [
            '\u{e9}', '\u{0}', '0', '9', ' ', '+', '-', ':', '.', 'T', 'Z',
        ];
        for seed in seeds {
            for (i, _) in seed.char_indices() {
                let _ = Timestamp::parse("t", &seed[..i]);
                for c in swaps {
                    let mut s = seed.to_owned();
                    s.replace_range(i..i + 1, c.encode_utf8(&mut [0; 4]));
                    if let Ok(t) = Timestamp::parse("t", &s) {
                        assert!((1..=9999).contains(&t.0.year()), "{s:?} gave {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn timestamps_count_seconds_and_saturate_at_the_edges() {
        let t = |s: &str| Timestamp::parse("t", s).unwrap();
        assert_eq!(t("1970-01-01T00:00:00Z").unix_secs(), 0);
        assert_eq!(t("1969-12-31T23:59:59.5Z").unix_secs(), -1);
        assert_eq!(t("2026-12-01T00:00:00Z").unix_secs(), 1_796_083_200);
        assert_eq!(t("0001-01-01T00:00:00Z"), Timestamp::MIN);
        assert_eq!(t("9999-12-31T23:59:59.999999Z"), Timestamp::MAX);
        let hour = std::time::Duration::from_secs(3600);
        let now = Timestamp::now();
        assert_eq!(now.plus(hour).minus(hour), now);
        assert_eq!(now.plus(hour).unix_secs() - now.unix_secs(), 3600);
        // Below a microsecond counts as nothing, as it always did.
        assert_eq!(now.plus(std::time::Duration::from_nanos(999)), now);
        assert_eq!(
            t("1969-12-31T23:00:00Z").plus(hour * 2).to_string(),
            "1970-01-01T01:00:00.000000Z"
        );
        assert_eq!(Timestamp::MAX.plus(hour), Timestamp::MAX);
        assert_eq!(Timestamp::MIN.minus(hour), Timestamp::MIN);
        assert_eq!(now.plus(std::time::Duration::MAX), Timestamp::MAX);
        assert_eq!(now.minus(std::time::Duration::MAX), Timestamp::MIN);
        assert!(Timestamp::MIN < now && now < Timestamp::MAX);
        assert_eq!(
            serde_json::to_string(&t("2026-12-01T09:30:00.5+01:00")).unwrap(),
            r#""2026-12-01T08:30:00.500000Z""#
        );
    }

    #[test]
    fn timestamps_convert_to_and_from_datetime_values() {
        use mysql::Value;
        let t = |s: &str| Timestamp::parse("t", s).unwrap();
        assert_eq!(
            Value::from(Timestamp::MAX),
            Value::Date(9999, 12, 31, 23, 59, 59, 999_999)
        );
        assert_eq!(
            Value::from(t("1969-07-20T21:17:40.5+01:00")),
            Value::Date(1969, 7, 20, 20, 17, 40, 500_000)
        );
        for s in [
            "0001-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999999Z",
            "2026-12-01T09:30:00.000001Z",
            "9999-12-31T23:59:59.999999Z",
        ] {
            assert_eq!(
                Timestamp::try_from(Value::from(t(s))).ok(),
                Some(t(s)),
                "{s}"
            );
        }
        // The text protocol sends DATETIME as text.
        assert_eq!(
            Timestamp::try_from(Value::Bytes(b"2026-12-01 09:30:00.500000".to_vec())).ok(),
            Some(t("2026-12-01T09:30:00.5Z"))
        );
        for bad in [
            Value::NULL,
            Value::Date(0, 0, 0, 0, 0, 0, 0),
            Value::Date(0, 12, 31, 23, 59, 59, 999_999),
            Value::Date(2026, 2, 30, 0, 0, 0, 0),
            Value::Date(2026, 12, 1, 24, 0, 0, 0),
            Value::Date(10_000, 1, 1, 0, 0, 0, 0),
            Value::Bytes(b"0000-00-00 00:00:00".to_vec()),
            Value::Int(0),
        ] {
            assert!(Timestamp::try_from(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_parse_only_plain_positive_decimals() {
        assert_eq!("42".parse::<CouponId>().unwrap(), CouponId(42));
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "1;DROP",
            "abc",
            "99999999999999999999",
            " 1",
        ] {
            assert!(bad.parse::<CouponId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn passwords_are_counted_in_bytes_and_never_printed() {
        assert!(Password::parse("1234567").is_err());
        assert!(Password::parse(&"a".repeat(72)).is_ok());
        assert!(Password::parse(&"a".repeat(73)).is_err());
        // 24 three-byte characters are 72 bytes; 25 are 75.
        assert!(Password::parse(&"€".repeat(24)).is_ok());
        assert!(Password::parse(&"€".repeat(25)).is_err());
        let p = Password::parse("hunter2hunter2").unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        #[track_caller]
        fn check(input: &str, normalised: &str) {
            let got = Email::parse(input).map(|e| e.as_str().to_owned());
            assert_eq!(got.ok().as_deref(), Some(normalised), "{input:?}");
        }
        check(" Ada@Example.ORG ", "ada@example.org");
        // Look-alikes are one address: fullwidth letters and signs, NFC and NFD accents,
        // ligatures and other compatibility forms.
        check("\u{ff41}dmin@example.com", "admin@example.com");
        check(
            "\u{ff21}\u{ff24}\u{ff2d}\u{ff29}\u{ff2e}\u{ff20}example.com",
            "admin@example.com",
        );
        check("ren\u{e9}@example.com", "ren\u{e9}@example.com");
        check("rene\u{301}@example.com", "ren\u{e9}@example.com");
        check("RENE\u{301}@example.com", "ren\u{e9}@example.com");
        check("\u{fb01}le@example.com", "file@example.com");
        for bad in [
            "admin\u{200b}@example.com",
            "ad\u{200d}min@example.com",
            "admin@exa\u{ad}mple.com",
            "admin\u{202e}@example.com",
            "admin\u{feff}@example.com",
            "admin\u{2060}@example.com",
            "admin@example.com\u{e0041}",
        ] {
            let err = Email::parse(bad).map(|e| e.as_str().to_owned());
            assert!(
                matches!(&err, Err(Error::Invalid { field: "email", .. })),
                "{bad:?}: {err:?}"
            );
        }
        for bad in [
            "",
            "ada",
            "ada@",
            "@x.org",
            "ada@x",
            "a da@x.org",
            "ada@x..org",
            "a\u{0}@x.org",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn codes_stock_and_status_parse() {
        assert!(CouponCode::parse("SUMMER-2026_x").is_ok());
        for bad in ["", "has space", "x'; DROP TABLE coupons;--", "ü"] {
            assert!(CouponCode::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(CouponCode::parse(&"A".repeat(65)).is_err());
        assert!(Stock::parse(-1).is_err());
        assert!(Stock::parse(Stock::MAX + 1).is_err());
        assert_eq!(Stock::parse(0).unwrap().get(), 0);
        assert_eq!(Status::parse("inactive").unwrap(), Status::Inactive);
        assert!(Status::parse("PAUSED").is_err());
    }

    #[test]
    fn values_currencies_and_metadata_parse() {
        #[track_caller]
        fn refused<T: fmt::Debug>(got: Result<T, Error>, want: &str) {
            match got {
                Err(Error::Invalid { field, .. }) if field == want => {}
                other => panic!("want invalid {want}, got {other:?}"),
            }
        }
        assert_eq!(PercentOff::parse(1).unwrap().get(), 1);
        assert_eq!(PercentOff::parse(100).unwrap().get(), 100);
        for bad in [0, -1, 101, i64::MAX, i64::MIN] {
            refused(PercentOff::parse(bad), "percent_off");
        }
        assert_eq!(Amount::off(1).unwrap().get(), 1);
        assert_eq!(Amount::min_order(0).unwrap().get(), 0);
        assert_eq!(Amount::off(Amount::MAX).unwrap().get(), 1_000_000_000_000);
        for bad in [0, -1, Amount::MAX + 1, i64::MAX, i64::MIN] {
            refused(Amount::off(bad), "amount_off");
        }
        for bad in [-1, Amount::MAX + 1, i64::MIN] {
            refused(Amount::min_order(bad), "min_order_amount");
        }
        assert_eq!(Currency::parse("EUR").unwrap().as_str(), "EUR");
        for bad in [
            "",
            "eur",
            "Eur",
            "EU",
            "EURO",
            "E1R",
            "EU ",
            "\u{c9}UR",
            "\u{ff25}UR",
        ] {
            refused(Currency::parse(bad), "currency");
        }

        let m = |v: serde_json::Value| Metadata::parse(&v);
        let ok = m(serde_json::json!({"order": "A-1", "note": "", "\u{e9}t\u{e9}": "\u{1f600}"}));
        assert_eq!(ok.unwrap().get().len(), 3);
        assert!(m(serde_json::json!({})).unwrap().get().is_empty());
        let fifty: serde_json::Map<_, _> = (0..50)
            .map(|i| (format!("k{i}"), serde_json::json!("v".repeat(500))))
            .collect();
        assert_eq!(m(fifty.clone().into()).unwrap().get().len(), 50);
        let mut fifty_one = fifty;
        fifty_one.insert("k50".into(), "v".into());
        refused(m(fifty_one.into()), "metadata");
        // Characters, not bytes: 40 two-byte characters are a good key, 500 a good value.
        assert!(m(serde_json::json!({"\u{e9}".repeat(40): "x"})).is_ok());
        assert!(m(serde_json::json!({"k": "\u{e9}".repeat(500)})).is_ok());
        for bad in [
            serde_json::json!(null),
            serde_json::json!("text"),
            serde_json::json!(["a"]),
            serde_json::json!({"": "x"}),
            serde_json::json!({"k".repeat(41): "x"}),
            serde_json::json!({"k": "v".repeat(501)}),
            serde_json::json!({"n": 1}),
            serde_json::json!({"b": true}),
            serde_json::json!({"z": null}),
            serde_json::json!({"o": {"nested": "x"}}),
        ] {
            refused(m(bad), "metadata");
        }
        // Past what the TEXT column holds: 50 keys and values all of four-byte characters.
        let wide: serde_json::Map<_, _> = (0..50)
            .map(|i| {
                let key = format!("{i:02}{}", "\u{1f600}".repeat(38));
                (key, serde_json::json!("\u{1f600}".repeat(500)))
            })
            .collect();
        refused(m(wide.into()), "metadata");
    }
}
