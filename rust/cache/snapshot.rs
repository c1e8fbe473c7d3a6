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
//! over `path`, and the directory fsynced, so a crash leaves the old file or the new one. They
//! are streamed there while the cache is read a chunk at a time, its lock released between
//! chunks (see [`write_to`]), so a save never stalls the packet path for long nor builds the
//! file in memory. Names appear in the order the walk meets them; entries are in eviction order.
//! Reading: the whole file is checked (magic, version, checksum, every field) before anything is
//! kept; entries already expired at load time are dropped.

use std::fs::{self, File};
use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::RwLock;

use hashbrown::HashMap;

use super::error::CacheError;
use super::names;
use super::store::{Cache, Config};

pub const MAGIC: &[u8; 8] = b"FQDNGCS\0";
pub const VERSION: u32 = 1;
const HEADER: usize = 48;

/// Entries read per hold of the cache's lock while a snapshot or a listing is taken: a few
/// hundred microseconds of work, so the packet path that records answers waits at most that.
pub const CHUNK: usize = 512;

/// Where a snapshot reads the cache from, one piece at a time.
pub trait Source {
    /// Runs `f` on the cache, holding its lock (if any) only for that call.
    fn with<R>(&self, f: impl FnOnce(&Cache) -> R) -> Result<R, CacheError>;
}

impl Source for &Cache {
    fn with<R>(&self, f: impl FnOnce(&Cache) -> R) -> Result<R, CacheError> {
        Ok(f(self))
    }
}

impl Source for &RwLock<Cache> {
    fn with<R>(&self, f: impl FnOnce(&Cache) -> R) -> Result<R, CacheError> {
        let guard = self.read().map_err(|_| CacheError::Poisoned)?;
        Ok(f(&guard))
    }
}

/// An entry waiting for the entries section: 24 bytes for IPv4 (`A = [u8; 4]`), 40 for IPv6.
#[derive(Clone, Copy)]
struct Pending<A> {
    expires: f64,
    stamp: u32,
    endpoint: u32,
    name: u32,
    addr: A,
}

impl<A> Pending<A> {
    fn key(&self) -> (f64, u32) {
        (self.expires, self.stamp)
    }
}

fn key_order(a: (f64, u32), b: (f64, u32)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// An entry copied out of the cache under its lock; its name is in a buffer beside, ending at
/// `name_end`.
#[derive(Clone, Copy)]
struct Seen {
    key: u32,
    name_end: usize,
    endpoint: u32,
    ip: IpAddr,
    expires: f64,
    stamp: u32,
}

/// A writer that keeps the CRC-32 and the length of what went through it.
struct Summed<W> {
    out: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Summed<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        self.out.write_all(bytes)
    }
}

/// Why writing a snapshot stopped.
#[derive(Debug)]
pub enum WriteError {
    Cache(CacheError),
    Io(std::io::Error),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl From<CacheError> for WriteError {
    fn from(e: CacheError) -> Self {
        WriteError::Cache(e)
    }
}

/// Writes a snapshot of the cache behind `source` to `out` (the format above) without holding
/// the cache for the whole of it: the entries are read [`CHUNK`] at a time, the lock released
/// in between, and the names go out as they are met. What stays in memory until the end is one
/// small record per entry (24 bytes for IPv4, 40 for IPv6) and one map entry per name, to
/// write the entries sorted by (expiry, stamp) as the format wants; the header is written last,
/// at the start, once the counts are known.
///
/// The result is a snapshot of every entry that lived through the whole call, each with the
/// expiry it had when read; an entry made or extended meanwhile may be missing (the next
/// snapshot has it) and one that went away meanwhile may be there (it is dropped at load time
/// when expired). A name is written once unless the cache compacted its names meanwhile.
pub fn write_to<S: Source, W: Write + Seek>(source: S, out: W) -> Result<W, WriteError> {
    let mut w = Summed {
        out,
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    w.out.write_all(&[0u8; HEADER])?;
    let mut v4: Vec<Pending<[u8; 4]>> = Vec::new();
    let mut v6: Vec<Pending<[u8; 16]>> = Vec::new();
    // name key -> index in the file, valid while the epoch holds.
    let mut name_ids: HashMap<u32, u32> = HashMap::new();
    let mut epoch = None;
    let mut names_written: u32 = 0;
    let mut names_buf: Vec<u8> = Vec::with_capacity(CHUNK * 32);
    let mut cursor = Some(0u32);
    let mut cfg = Config::default();
    let mut counters = (0, 0);
    // One chunk as read under the lock; the map and the lists grow after the lock is released
    // (a map doubling at a million names takes tens of milliseconds).
    let mut chunk: Vec<Seen> = Vec::with_capacity(CHUNK * 2);
    let mut chunk_names: Vec<u8> = Vec::with_capacity(CHUNK * 32);
    while let Some(from) = cursor {
        chunk.clear();
        chunk_names.clear();
        let mut chunk_epoch = 0;
        cursor = source.with(|c| {
            chunk_epoch = c.name_key_epoch();
            cfg = c.config();
            counters = c.counters();
            c.visit(from, CHUNK, |e| {
                chunk_names.extend_from_slice(e.name);
                chunk.push(Seen {
                    key: e.name_key,
                    name_end: chunk_names.len(),
                    endpoint: e.endpoint,
                    ip: e.ip,
                    expires: e.expires,
                    stamp: e.stamp,
                });
            })
        })?;
        if epoch != Some(chunk_epoch) {
            epoch = Some(chunk_epoch);
            name_ids.clear();
        }
        names_buf.clear();
        let mut start = 0;
        for &Seen {
            key,
            name_end,
            endpoint,
            ip,
            expires,
            stamp,
        } in &chunk
        {
            let wire = &chunk_names[start..name_end];
            start = name_end;
            let name = *name_ids.entry(key).or_insert_with(|| {
                names_buf.push(wire.len() as u8);
                names_buf.extend_from_slice(wire);
                names_written += 1;
                names_written - 1
            });
            match ip {
                IpAddr::V4(a) => v4.push(Pending {
                    expires,
                    stamp,
                    endpoint,
                    name,
                    addr: a.octets(),
                }),
                IpAddr::V6(a) => v6.push(Pending {
                    expires,
                    stamp,
                    endpoint,
                    name,
                    addr: a.octets(),
                }),
            }
        }
        w.put(&names_buf)?;
    }
    drop(name_ids);
    v4.sort_unstable_by(|a, b| key_order(a.key(), b.key()));
    v6.sort_unstable_by(|a, b| key_order(a.key(), b.key()));
    // Merge the two sorted lists into the entries section.
    let (mut i, mut j) = (0, 0);
    let mut rec = [0u8; 4 + 4 + 1 + 16 + 8];
    while i < v4.len() || j < v6.len() {
        let take_v4 =
            j == v6.len() || (i < v4.len() && key_order(v4[i].key(), v6[j].key()).is_le());
        let n = if take_v4 {
            let p = &v4[i];
            i += 1;
            rec[..4].copy_from_slice(&p.endpoint.to_le_bytes());
            rec[4..8].copy_from_slice(&p.name.to_le_bytes());
            rec[8] = 4;
            rec[9..13].copy_from_slice(&p.addr);
            rec[13..21].copy_from_slice(&p.expires.to_le_bytes());
            21
        } else {
            let p = &v6[j];
            j += 1;
            rec[..4].copy_from_slice(&p.endpoint.to_le_bytes());
            rec[4..8].copy_from_slice(&p.name.to_le_bytes());
            rec[8] = 6;
            rec[9..25].copy_from_slice(&p.addr);
            rec[25..33].copy_from_slice(&p.expires.to_le_bytes());
            33
        };
        w.put(&rec[..n])?;
    }
    let entries = (v4.len() + v6.len()) as u32;
    drop((v4, v6));
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&cfg.min_ttl.to_le_bytes());
    header.extend_from_slice(&cfg.max_ips_per_name.to_le_bytes());
    header.extend_from_slice(&cfg.max_entries.to_le_bytes());
    header.extend_from_slice(&counters.0.to_le_bytes());
    header.extend_from_slice(&counters.1.to_le_bytes());
    header.extend_from_slice(&names_written.to_le_bytes());
    header.extend_from_slice(&entries.to_le_bytes());
    // The checksum covers the header and then the body: the body's, appended to the header's.
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.combine(&w.crc);
    let mut out = w.out;
    out.write_all(&crc.finalize().to_le_bytes())?;
    out.seek(SeekFrom::Start(0))?;
    out.write_all(&header)?;
    out.seek(SeekFrom::End(0))?;
    Ok(out)
}

/// Serialises the cache in memory (tests, and callers that want the bytes).
pub fn encode(cache: &Cache) -> Vec<u8> {
    match write_to(cache, Cursor::new(Vec::new())) {
        Ok(c) => c.into_inner(),
        // Neither reading a plain cache nor writing to memory can fail.
        Err(_) => Vec::new(),
    }
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

/// Writes `path` atomically: `fill` writes a temporary file beside it, which is fsynced and
/// renamed over `path`, then the directory is fsynced; on error the temporary file is removed.
fn write_file_atomic(
    path: &Path,
    fill: impl FnOnce(File, &Path) -> Result<File, CacheError>,
) -> Result<(), CacheError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let f = File::create(&tmp).map_err(|e| io_err("write", &tmp, &e))?;
        let f = fill(f, &tmp)?;
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

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    write_file_atomic(path, |mut f, tmp| {
        f.write_all(bytes).map_err(|e| io_err("write", tmp, &e))?;
        Ok(f)
    })
}

/// Saves a snapshot of the cache behind `source` to `path` atomically, streaming it (see
/// [`write_to`]): the file is written as the entries are read, never built in memory.
pub fn save<S: Source>(source: S, path: &Path) -> Result<(), CacheError> {
    write_file_atomic(path, |f, tmp| {
        let out = write_to(source, BufWriter::with_capacity(1 << 20, f)).map_err(|e| match e {
            WriteError::Cache(e) => e,
            WriteError::Io(e) => io_err("write", tmp, &e),
        })?;
        out.into_inner()
            .map_err(|e| io_err("write", tmp, e.error()))
    })
}

/// Loads a snapshot from `path`, dropping entries expired at `now`.
pub fn load(path: &Path, now: f64) -> Result<Cache, CacheError> {
    let data = fs::read(path).map_err(|e| io_err("read", path, &e))?;
    decode(&data, now).map_err(|reason| CacheError::Snapshot {
        path: path.display().to_string(),
        reason,
    })
}
