//! Random bytes from the operating system, and bytes written as hex: one source for unique
//! codes and secrets, one encoding for secrets and digests.

use crate::Error;
use std::fmt::Write;
use std::io::Read;

/// Random bytes from the operating system: unique codes, the JWT secret, webhook secrets.
pub(crate) struct Random {
    source: std::io::BufReader<std::fs::File>,
}

impl Random {
    pub(crate) fn new() -> Result<Random, Error> {
        let file = std::fs::File::open("/dev/urandom")
            .map_err(|e| Error::Internal(format!("opening /dev/urandom: {e}")))?;
        Ok(Random {
            source: std::io::BufReader::with_capacity(1 << 16, file),
        })
    }

    /// A uniform number below `n` (2 to 256), without modulo bias.
    pub(crate) fn below(&mut self, n: usize) -> Result<usize, Error> {
        let limit = 256 - 256 % n;
        loop {
            let [b] = self.bytes::<1>()?;
            if (b as usize) < limit {
                return Ok(b as usize % n);
            }
        }
    }

    /// A uniform number below `n`, any size.
    pub(crate) fn below_u64(&mut self, n: u64) -> Result<u64, Error> {
        let limit = u64::MAX - u64::MAX % n;
        loop {
            let v = u64::from_le_bytes(self.bytes::<8>()?);
            if v < limit {
                return Ok(v % n);
            }
        }
    }

    pub(crate) fn bytes<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut b = [0u8; N];
        self.source
            .read_exact(&mut b)
            .map_err(|e| Error::Internal(format!("reading /dev/urandom: {e}")))?;
        Ok(b)
    }
}

/// `bytes` in lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
