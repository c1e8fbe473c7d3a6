use std::fmt;

/// Why a cache operation was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// A constructor limit is out of range.
    BadLimit {
        what: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    /// `now` (or a computed expiry) is NaN or infinite.
    BadTime { what: &'static str, value: String },
    /// A TTL outside 0..=2^32-1 (RFC 2181 section 8: a TTL is an unsigned 32-bit count).
    BadTtl { ip: String, ttl: i64 },
    /// Text that is not an IPv4 or IPv6 address.
    BadAddress { text: String },
    /// A packed address that is neither 4 (IPv4) nor 16 (IPv6) bytes long.
    BadPackedAddress { len: usize },
    /// The name store would pass its 4 GiB addressing limit.
    NamesFull,
    /// A snapshot could not be read or written (the operating system's reason).
    Io {
        op: &'static str,
        path: String,
        reason: String,
    },
    /// A snapshot file is not one this build can load: corrupt, truncated, other version.
    Snapshot { path: String, reason: String },
    /// The cache's lock was poisoned by a panic while it was held.
    Poisoned,
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::BadLimit {
                what,
                value,
                min,
                max,
            } => write!(f, "{what} = {value} is out of range {min}..={max}"),
            CacheError::BadTime { what, value } => {
                write!(f, "{what} = {value} is not a finite time in seconds")
            }
            CacheError::BadTtl { ip, ttl } => write!(
                f,
                "ttl {ttl} for {ip} is out of range 0..=4294967295 (an unsigned 32-bit count of seconds)"
            ),
            CacheError::BadAddress { text } => {
                let mut t = text.clone();
                if t.len() > 100 {
                    let mut cut = 100;
                    while !t.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    t.truncate(cut);
                    t.push_str("...");
                }
                write!(f, "{t:?} is not an IPv4 or IPv6 address")
            }
            CacheError::BadPackedAddress { len } => write!(
                f,
                "a packed IP address must be 4 (IPv4) or 16 (IPv6) bytes, not {len}"
            ),
            CacheError::NamesFull => write!(f, "the cache's name store is full (4 GiB of names)"),
            CacheError::Io { op, path, reason } => {
                write!(f, "cannot {op} cache snapshot {path:?}: {reason}")
            }
            CacheError::Snapshot { path, reason } => {
                write!(f, "cache snapshot {path:?} not loaded: {reason}")
            }
            CacheError::Poisoned => f.write_str("the cache's lock was poisoned by an earlier panic"),
        }
    }
}

impl std::error::Error for CacheError {}
