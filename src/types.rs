//! Newtypes that parse: a value of one of these types has already been checked, so the
//! functions that take them never see raw, unchecked input.

use crate::Error;
use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// An email address, trimmed and lower-cased so that `Ada@X.org` and `ada@x.org` are one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Accepts `local@domain.tld` of at most 254 bytes, with no spaces or control characters.
    pub fn parse(s: &str) -> Result<Email, Error> {
        let s = s.trim().to_lowercase();
        let bad = |why: &str| Err(Error::invalid("email", why));
        if s.is_empty() || s.len() > 254 {
            return bad("must be 1 to 254 bytes");
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("must not contain spaces or control characters");
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

/// A UTC instant with microsecond precision, stored as `DATETIME(6)` and shown as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    micros: i64,
}

impl Timestamp {
    /// The current time, from the service's clock (never the database session's time zone).
    pub fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            micros: d.as_micros() as i64,
        }
    }

    /// This instant, `d` later.
    pub fn plus(self, d: std::time::Duration) -> Timestamp {
        Timestamp {
            micros: self.micros + d.as_micros() as i64,
        }
    }

    /// This instant, `d` earlier.
    pub fn minus(self, d: std::time::Duration) -> Timestamp {
        Timestamp {
            micros: self.micros - d.as_micros() as i64,
        }
    }

    /// Parses RFC 3339 (`2026-12-01T00:00:00Z`, `2026-12-01T09:30:00.5+01:00`) into UTC.
    pub fn parse(field: &'static str, s: &str) -> Result<Timestamp, Error> {
        Timestamp::parse_rfc3339(s.trim()).ok_or_else(|| {
            Error::invalid(
                field,
                "must be an RFC 3339 time such as 2026-12-01T00:00:00Z",
            )
        })
    }

    fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let t = s.get(r)?;
            t.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| t.parse().ok())?
        };
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !matches!(b[10], b'T' | b't' | b' ')
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let mut i = 19;
        let mut micros = 0u32;
        if b[i] == b'.' {
            let start = i + 1;
            i = start;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let frac = s.get(start..i)?;
            if frac.is_empty() {
                return None;
            }
            let six: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
            micros = six.parse().ok()?;
        }
        let offset_secs: i64 = match s.get(i..)? {
            "Z" | "z" => 0,
            tz if tz.len() == 6
                && (tz.starts_with('+') || tz.starts_with('-'))
                && &tz[3..4] == ":" =>
            {
                let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
                if oh > 23 || om > 59 {
                    return None;
                }
                let secs = i64::from(oh * 3600 + om * 60);
                if tz.starts_with('-') {
                    -secs
                } else {
                    secs
                }
            }
            _ => return None,
        };
        let days_in_month = match mo {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
            2 => 28,
            _ => return None,
        };
        if !(1970..=9999).contains(&y)
            || d == 0
            || d > days_in_month
            || h > 23
            || mi > 59
            || sec > 59
        {
            return None;
        }
        let local = Timestamp::from_parts(i64::from(y), mo, d, h, mi, sec, micros);
        Some(Timestamp {
            micros: local.micros - offset_secs * 1_000_000,
        })
    }

    /// Seconds since the Unix epoch.
    pub fn unix_secs(self) -> i64 {
        self.micros.div_euclid(1_000_000)
    }

    fn parts(self) -> (i64, u32, u32, u32, u32, u32, u32) {
        let secs = self.unix_secs();
        let micros = self.micros.rem_euclid(1_000_000) as u32;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (
            year,
            month,
            day,
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            micros,
        )
    }

    fn from_parts(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32, us: u32) -> Timestamp {
        // Howard Hinnant's days_from_civil.
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = i64::from((mo + 9) % 12);
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + s);
        Timestamp {
            micros: secs * 1_000_000 + i64::from(us),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s, us) = self.parts();
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl From<Timestamp> for mysql::Value {
    fn from(t: Timestamp) -> mysql::Value {
        let (y, mo, d, h, mi, s, us) = t.parts();
        mysql::Value::Date(y as u16, mo as u8, d as u8, h as u8, mi as u8, s as u8, us)
    }
}

impl mysql::prelude::FromValue for Timestamp {
    type Intermediate = Timestamp;
}

impl TryFrom<mysql::Value> for Timestamp {
    type Error = mysql::FromValueError;
    fn try_from(v: mysql::Value) -> Result<Timestamp, mysql::FromValueError> {
        match v {
            mysql::Value::Date(y, mo, d, h, mi, s, us) => Ok(Timestamp::from_parts(
                i64::from(y),
                u32::from(mo),
                u32::from(d),
                u32::from(h),
                u32::from(mi),
                u32::from(s),
                us,
            )),
            other => Err(mysql::FromValueError(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trips_through_civil_dates() {
        for micros in [
            0,
            951_782_400_123_456,
            1_795_651_200_000_001,
            -86_400_000_000,
        ] {
            let t = Timestamp { micros };
            let (y, mo, d, h, mi, s, us) = t.parts();
            assert_eq!(Timestamp::from_parts(y, mo, d, h, mi, s, us), t);
        }
        let leap = Timestamp {
            micros: 951_782_400_123_456,
        };
        assert_eq!(leap.to_string(), "2000-02-29T00:00:00.123456Z");
    }

    #[test]
    fn rfc3339_times_parse_to_utc() {
        let t = |s: &str| Timestamp::parse("t", s).map(|t| t.to_string());
        assert_eq!(
            t("2026-12-01T00:00:00Z").unwrap(),
            "2026-12-01T00:00:00.000000Z"
        );
        assert_eq!(
            t("2026-12-01T09:30:00.5+01:00").unwrap(),
            "2026-12-01T08:30:00.500000Z"
        );
        assert_eq!(
            t("2024-02-29T23:59:59.123456789-02:30").unwrap(),
            "2024-03-01T02:29:59.123456Z"
        );
        for bad in [
            "",
            "2026-12-01",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T00:00:00",
            "2026-12-01T00:00:00+0100",
            "2026-12-01T00:00:00.Z",
            "x026-12-01T00:00:00Z",
        ] {
            assert!(t(bad).is_err(), "{bad:?} parsed");
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
        assert_eq!(
            Email::parse(" Ada@Example.ORG ").unwrap().as_str(),
            "ada@example.org"
        );
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
}
