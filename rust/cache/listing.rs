//! The cache as NDJSON, one piece at a time: what `fqdnguard cache list` prints, streamed by
//! the control socket (`GET /v1/cache`) without building the whole listing anywhere.

use std::io::Write;
use std::net::IpAddr;

use super::error::CacheError;
use super::names;
use super::snapshot::{Source, CHUNK};

/// Which entries a listing shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub endpoint: Option<u32>,
    /// A name in wire form (see [`names::wire_from_presentation`]).
    pub name: Option<Vec<u8>>,
}

/// Appends one JSON object per line for the entries that `filter` keeps, reading the cache from
/// group slot `from` on, [`CHUNK`] entries per hold of its lock (copied out, then formatted
/// with the lock released), until about `budget` entries were read. Returns the slot to go on from, None when the listing is complete. A line is
/// `{"endpoint":7,"name":"www.example.com.","ip":"192.0.2.1","expires_at":1700000000.125}`:
/// the name in presentation form (see [`names::display`]), the expiry in seconds since the
/// epoch, to the millisecond. The order is the cache's (the entries of one endpoint and name
/// together), not sorted; see [`crate::cache::Cache::visit`] for what a listing taken while the
/// cache changes shows.
pub fn list<S: Source>(
    source: S,
    from: u32,
    filter: &Filter,
    budget: usize,
    out: &mut Vec<u8>,
) -> Result<Option<u32>, CacheError> {
    let mut cursor = Some(from);
    let mut read = 0usize;
    // What a chunk keeps, copied out under the lock and formatted after it is released.
    let mut kept: Vec<(u32, usize, IpAddr, f64)> = Vec::with_capacity(CHUNK);
    let mut name_bytes: Vec<u8> = Vec::with_capacity(CHUNK * 32);
    while let Some(at) = cursor {
        if read >= budget {
            break;
        }
        let chunk = CHUNK.min(budget - read);
        kept.clear();
        name_bytes.clear();
        cursor = source.with(|c| {
            c.visit(at, chunk, |e| {
                read += 1;
                if filter.endpoint.is_some_and(|ep| ep != e.endpoint)
                    || filter.name.as_deref().is_some_and(|n| n != e.name)
                {
                    return;
                }
                name_bytes.extend_from_slice(e.name);
                kept.push((e.endpoint, name_bytes.len(), e.ip, e.expires));
            })
        })?;
        let mut start = 0;
        for &(endpoint, end, ip, expires) in &kept {
            let _ = write!(out, "{{\"endpoint\":{endpoint},\"name\":\"");
            json_text(&names::display(&name_bytes[start..end]), out);
            let _ = writeln!(out, "\",\"ip\":\"{ip}\",\"expires_at\":{expires:.3}}}");
            start = end;
        }
    }
    Ok(cursor)
}

/// Appends `text` escaped for a JSON string. Names come out of [`names::display`] as printable
/// ASCII, so only `"` and `\` need escaping; anything else below 0x20 is escaped too.
fn json_text(text: &str, out: &mut Vec<u8>) {
    for &b in text.as_bytes() {
        match b {
            b'"' | b'\\' => {
                out.push(b'\\');
                out.push(b);
            }
            0..=0x1f => {
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
}
