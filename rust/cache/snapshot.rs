//! Snapshot files: a versioned binary format with a CRC-32 trailer, written atomically.
//!
//! Layout (little-endian):
//! ```text
//! 0   magic            8 bytes  b"FQDNGCS\0"
//! 8   version          u32      = 1
//! 12  min_ttl          u32
//! 16  max_ips_per_name u32
//! 20  max_entries      u32
//! 24  evictions        u64
//! 32  name_evictions   u64
//! 40  name count       u32
//! 44  entry count      u32
//! 48  names            per name: length u8, then that many bytes (wire form, no root byte)
//! ..  entries          per entry, in eviction order: endpoint u32, name index u32,
//!                      family u8 (4 or 6), address (4 or 16 bytes), expiry f64 (seconds)
//! end crc32            u32 over every byte before it (IEEE, as zlib.crc32)
//! ```
//! Writing: the bytes go to `<path>.tmp.<pid>` in the same directory, which is fsynced, renamed
//! over `path`, and the directory fsynced, so a crash leaves the old file or the new one.
//! Reading: the whole file is checked (magic, version, checksum, every field) before anything is
//! kept; entries already expired at load time are dropped.

use std::fs::{self, File};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use hashbrown::HashMap;

use super::error::CacheError;
use super::names;
use super::store::{Cache, Config};

pub const MAGIC: &[u8; 8] = b"FQDNGCS\0";
pub const VERSION: u32 = 1;
const HEADER: usize = 48;

/// Serialises the cache.
pub fn encode(cache: &Cache) -> Vec<u8> {
    let entries = cache.entries_ordered();
    let cfg = cache.config();
    let stats = cache.stats();
    let mut name_ids: HashMap<&[u8], u32> = HashMap::new();
    let mut name_list: Vec<&[u8]> = Vec::new();
    for &(_, wire, _, _) in &entries {
        name_ids.entry(wire).or_insert_with(|| {
            name_list.push(wire);
            (name_list.len() - 1) as u32
        });
    }
    let mut out = Vec::with_capacity(HEADER + name_list.len() * 24 + entries.len() * 21 + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&cfg.min_ttl.to_le_bytes());
    out.extend_from_slice(&cfg.max_ips_per_name.to_le_bytes());
    out.extend_from_slice(&cfg.max_entries.to_le_bytes());
    out.extend_from_slice(&stats.evictions.to_le_bytes());
    out.extend_from_slice(&stats.name_evictions.to_le_bytes());
    out.extend_from_slice(&(name_list.len() as u32).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for n in &name_list {
        out.push(n.len() as u8);
        out.extend_from_slice(n);
    }
    for &(ep, wire, ip, expires) in &entries {
        out.extend_from_slice(&ep.to_le_bytes());
        out.extend_from_slice(&name_ids[wire].to_le_bytes());
        match ip {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&expires.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A bounds-checked reader: every read says what it wanted when the data runs out.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        match self.data.get(self.pos..self.pos + n) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(format!("ends inside {what} at byte {}", self.pos)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn f64(&mut self, what: &str) -> Result<f64, String> {
        Ok(f64::from_le_bytes(self.array(what)?))
    }
}

/// Parses and checks a snapshot, then builds a cache holding the entries unexpired at `now`.
/// The error string says what is wrong; nothing is built unless all of it checks out.
pub fn decode(data: &[u8], now: f64) -> Result<Cache, String> {
    if data.len() < 12 || &data[..8] != MAGIC {
        if data.len() >= 8 && &data[..8] == MAGIC {
            return Err(format!(
                "truncated: {} bytes, shorter than a header",
                data.len()
            ));
        }
        return Err("not an fqdnguard cache snapshot (bad magic bytes)".to_owned());
    }
    let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if version != VERSION {
        return Err(format!(
            "snapshot format version {version}; this build reads version {VERSION}"
        ));
    }
    if data.len() < HEADER + 4 {
        return Err(format!(
            "truncated: {} bytes, shorter than a header",
            data.len()
        ));
    }
    let (body, trailer) = data.split_at(data.len() - 4);
    let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x}): the file is truncated or corrupt"
        ));
    }
    let mut r = Reader {
        data: body,
        pos: 12,
    };
    let min_ttl = r.u32("min_ttl")?;
    let max_ips = r.u32("max_ips_per_name")?;
    let max_entries = r.u32("max_entries")?;
    let cfg = Config::new(min_ttl.into(), max_ips.into(), max_entries.into())
        .map_err(|e| format!("bad limits: {e}"))?;
    let evictions = r.u64("evictions")?;
    let name_evictions = r.u64("name_evictions")?;
    let name_count = r.u32("the name count")? as usize;
    let entry_count = r.u32("the entry count")? as usize;
    if name_count > body.len() || entry_count > body.len() / 21 {
        return Err(format!(
            "counts ({name_count} names, {entry_count} entries) do not fit in {} bytes",
            body.len()
        ));
    }
    let mut name_list: Vec<&[u8]> = Vec::with_capacity(name_count);
    for i in 0..name_count {
        let n = r.u8("a name length")? as usize;
        let wire = r.take(n, "a name")?;
        if !names::is_valid_wire(wire) {
            return Err(format!(
                "name {i} at byte {} is not a valid name",
                r.pos - n
            ));
        }
        name_list.push(wire);
    }
    let mut cache = Cache::new(cfg);
    let mut prev = f64::NEG_INFINITY;
    for i in 0..entry_count {
        let ep = r.u32("an entry's endpoint")?;
        let name = r.u32("an entry's name index")? as usize;
        let wire = *name_list
            .get(name)
            .ok_or_else(|| format!("entry {i} names index {name} of {name_count}"))?;
        let ip = match r.u8("an entry's address family")? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>("an IPv4 address")?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>("an IPv6 address")?)),
            f => return Err(format!("entry {i} has address family {f}, not 4 or 6")),
        };
        let expires = r.f64("an entry's expiry")?;
        if !expires.is_finite() || expires < prev {
            return Err(format!("entry {i} has expiry {expires} out of order"));
        }
        prev = expires;
        if expires > now {
            cache
                .restore(ep, wire, ip, expires)
                .map_err(|e| e.to_string())?;
        }
    }
    if r.pos != body.len() {
        return Err(format!(
            "{} unexpected bytes after the entries",
            body.len() - r.pos
        ));
    }
    cache.set_counters(evictions, name_evictions);
    Ok(cache)
}

fn io_err(op: &'static str, path: &Path, e: &std::io::Error) -> CacheError {
    CacheError::Io {
        op,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err("write", &tmp, &e))?;
        f.write_all(bytes).map_err(|e| io_err("write", &tmp, &e))?;
        f.sync_all().map_err(|e| io_err("fsync", &tmp, &e))?;
        fs::rename(&tmp, path).map_err(|e| io_err("rename into place", path, &e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("fsync the directory of", path, &e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Saves a snapshot of `cache` to `path`.
pub fn save(cache: &Cache, path: &Path) -> Result<(), CacheError> {
    write_atomic(path, &encode(cache))
}

/// Loads a snapshot from `path`, dropping entries expired at `now`.
pub fn load(path: &Path, now: f64) -> Result<Cache, CacheError> {
    let data = fs::read(path).map_err(|e| io_err("read", path, &e))?;
    decode(&data, now).map_err(|reason| CacheError::Snapshot {
        path: path.display().to_string(),
        reason,
    })
}
