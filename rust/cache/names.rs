//! Names as the cache stores them, and the interning table that gives each a `u32` id.
//!
//! A name is kept in **wire form without the root byte**: each label preceded by its length,
//! leaf first, lower-cased (ASCII only, RFC 4343) by [`LabelBuf`]. That form is exact for every
//! name DNS can carry: a `.` inside a label, a zero byte or a non-ASCII byte stays one byte of one
//! label and never changes the label boundaries, and two spellings of one name (`A.b` and `a.B.`,
//! `a\.b` and `a\046b`) give the same bytes. Names leave the cache in presentation form, absolute
//! (trailing dot), with RFC 1035 section 5.1 escapes for `.`, `\` and bytes outside `!`..`~`, so
//! [`LabelBuf::from_presentation`] reads back exactly the stored bytes.
//!
//! The bytes live in one arena (`Vec<u8>`); each id holds offset, length and a reference count.
//! Freed space is reclaimed by compacting the arena in place when an eighth of it is garbage,
//! so the arena never holds more than about 8/7 of the live bytes and its allocation never moves
//! under a stream of new names.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::pattern::{LabelBuf, PatternError};

const MAX_LABEL: usize = 63;
/// RFC 1035 2.3.4: 255 bytes of wire form, root byte included.
const MAX_WIRE: usize = 255;

use super::error::CacheError;

/// Appends `name` in wire form, without the root byte.
pub fn wire_of(name: &LabelBuf, out: &mut Vec<u8>) {
    for i in 0..name.len() {
        let l = name.label(i);
        // LabelBuf guarantees 1..=63 bytes per label.
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
}

/// Appends the name written in presentation form `text` (as [`LabelBuf::from_presentation`]
/// reads it) in wire form, without the root byte; on error nothing is appended. Names without
/// escapes are converted straight from the text; the rest go through [`LabelBuf`].
pub fn wire_from_presentation(text: &[u8], out: &mut Vec<u8>) -> Result<(), PatternError> {
    if wire_plain(text, out) {
        return Ok(());
    }
    // Escapes, the root, or an error: LabelBuf gives the exact result or error.
    wire_of(&LabelBuf::from_presentation(text)?, out);
    Ok(())
}

/// The fast path of [`wire_from_presentation`]: a name without escapes is its text lower-cased
/// and shifted by one byte, with each label's length written where the dot before it was
/// (`a.bc` -> `1 a 2 b c`). False, with nothing appended, for anything else.
fn wire_plain(text: &[u8], out: &mut Vec<u8>) -> bool {
    let body = text.strip_suffix(b".").unwrap_or(text);
    // Wire length with the root byte: every label plus its length byte, plus one.
    if body.is_empty() || body.len() + 2 > MAX_WIRE {
        return false;
    }
    let start = out.len();
    out.push(0);
    out.extend(body.iter().map(u8::to_ascii_lowercase));
    // `len_at`: where the current label's length byte goes; `i + 1`: where body[i] went.
    let mut len_at = 0usize;
    for i in 0..body.len() {
        let b = body[i];
        if b == b'.' || b == b'\\' {
            let n = i - len_at;
            if b == b'\\' || n == 0 || n > MAX_LABEL {
                out.truncate(start);
                return false;
            }
            out[start + len_at] = n as u8;
            len_at = i + 1;
        }
    }
    let n = body.len() - len_at;
    if n == 0 || n > MAX_LABEL {
        out.truncate(start);
        return false;
    }
    out[start + len_at] = n as u8;
    true
}

/// True when `bytes` is a well-formed wire name without its root byte (labels of 1..=63 bytes,
/// at most 254 bytes in all) and already lower-cased.
pub fn is_valid_wire(bytes: &[u8]) -> bool {
    if bytes.len() > 254 {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let n = bytes[i] as usize;
        if n == 0 || n > 63 || i + 1 + n > bytes.len() {
            return false;
        }
        if bytes[i + 1..i + 1 + n].iter().any(u8::is_ascii_uppercase) {
            return false;
        }
        i += 1 + n;
    }
    true
}

/// Presentation form of a stored name: absolute, escaped so it reads back to the same bytes.
pub fn display(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return ".".to_owned();
    }
    let mut s = String::with_capacity(bytes.len() + 1);
    let mut i = 0;
    while i < bytes.len() {
        let n = bytes[i] as usize;
        let end = (i + 1 + n).min(bytes.len());
        for &b in &bytes[i + 1..end] {
            match b {
                b'.' | b'\\' => {
                    s.push('\\');
                    s.push(b as char);
                }
                0x21..=0x7e => s.push(b as char),
                _ => {
                    s.push('\\');
                    s.push_str(&format!("{b:03}"));
                }
            }
        }
        s.push('.');
        i = end;
    }
    s
}

const FREE: u32 = 0;

/// 9 bytes: a stored name is at most 254 bytes long.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed)]
struct NameRec {
    off: u32,
    /// Number of (endpoint, name) groups using the name; 0 marks a free id.
    refs: u32,
    len: u8,
}

impl NameRec {
    fn range(self) -> std::ops::Range<usize> {
        let off = self.off as usize;
        off..off + usize::from(self.len)
    }
}

/// Interned names: arena, records, free ids and a hash index keyed by the bytes.
#[derive(Debug, Default)]
pub struct Names {
    arena: Vec<u8>,
    recs: Vec<NameRec>,
    free: Vec<u32>,
    map: HashTable<u32>,
    garbage: usize,
}

impl Names {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self, id: u32) -> &[u8] {
        let r = self.recs[id as usize];
        &self.arena[r.range()]
    }

    pub fn find(&self, hasher: &DefaultHashBuilder, bytes: &[u8]) -> Option<u32> {
        self.find_hashed(hasher.hash_one(bytes), bytes)
    }

    fn find_hashed(&self, h: u64, bytes: &[u8]) -> Option<u32> {
        let (arena, recs) = (&self.arena, &self.recs);
        self.map
            .find(h, |&id| {
                let r = recs[id as usize];
                &arena[r.range()] == bytes
            })
            .copied()
    }

    /// The id of `bytes`, added with no references when new.
    pub fn intern(&mut self, hasher: &DefaultHashBuilder, bytes: &[u8]) -> Result<u32, CacheError> {
        let h = hasher.hash_one(bytes);
        if let Some(id) = self.find_hashed(h, bytes) {
            return Ok(id);
        }
        if self.arena.len() + bytes.len() > u32::MAX as usize {
            self.compact();
            if self.arena.len() + bytes.len() > u32::MAX as usize {
                return Err(CacheError::NamesFull);
            }
        }
        let rec = NameRec {
            off: self.arena.len() as u32,
            refs: FREE,
            // Callers pass names of at most 254 bytes (`is_valid_wire`).
            len: bytes.len().min(255) as u8,
        };
        self.arena.extend_from_slice(bytes);
        let id = match self.free.pop() {
            Some(id) => {
                self.recs[id as usize] = rec;
                id
            }
            None => {
                self.recs.push(rec);
                (self.recs.len() - 1) as u32
            }
        };
        let (arena, recs) = (&self.arena, &self.recs);
        self.map.insert_unique(h, id, |&i| {
            hasher.hash_one(&arena[recs[i as usize].range()])
        });
        Ok(id)
    }

    pub fn retain(&mut self, id: u32) {
        self.recs[id as usize].refs += 1;
    }

    /// Drops one reference; the last one frees the id and its bytes.
    pub fn release(&mut self, hasher: &DefaultHashBuilder, id: u32) {
        let r = &mut self.recs[id as usize];
        r.refs -= 1;
        if r.refs != FREE {
            return;
        }
        let h = hasher.hash_one(self.bytes(id));
        if let Ok(slot) = self.map.find_entry(h, |&i| i == id) {
            slot.remove();
        }
        self.garbage += usize::from(self.recs[id as usize].len);
        self.free.push(id);
        if self.garbage > 64 * 1024 && self.garbage * 8 >= self.arena.len() {
            self.compact();
        }
    }

    /// Moves the live names to the front of the arena, in place, in offset order. The arena is
    /// taken in four windows, each listing and sorting only its own names: the scratch list is
    /// a quarter of the names, which matters because allocator keeps a freed big block (glibc
    /// raises its mmap threshold after freeing one) and the process would hold it for good.
    fn compact(&mut self) {
        const WINDOWS: usize = 4;
        let end = self.arena.len();
        let step = end / WINDOWS + 1;
        let mut to = 0u32;
        // (offset, id) in one u64, so the sort compares plain integers.
        let mut live: Vec<u64> = Vec::new();
        for w in 0..WINDOWS {
            let window = (w * step) as u64..((w + 1) * step).min(end) as u64;
            live.clear();
            live.extend(
                self.recs
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.refs != FREE && window.contains(&u64::from(r.off)))
                    .map(|(i, r)| (u64::from(r.off) << 32) | i as u64),
            );
            live.sort_unstable();
            for &key in &live {
                let (off, id) = ((key >> 32) as u32, key as u32);
                let len = u32::from(self.recs[id as usize].len);
                self.arena
                    .copy_within(off as usize..(off + len) as usize, to as usize);
                self.recs[id as usize].off = to;
                to += len;
            }
        }
        self.arena.truncate(to as usize);
        self.garbage = 0;
    }

    pub fn memory(&self) -> usize {
        self.arena.capacity()
            + self.recs.capacity() * std::mem::size_of::<NameRec>()
            + self.free.capacity() * 4
            + self.map.allocation_size()
    }
}

#[cfg(test)]
impl Names {
    pub(crate) fn index_bytes(&self) -> usize {
        self.map.allocation_size()
    }

    pub(crate) fn arena_len(&self) -> usize {
        self.arena.len()
    }

    pub(crate) fn live_bytes(&self) -> usize {
        self.arena.len() - self.garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(text: &str) -> Vec<u8> {
        let mut v = Vec::new();
        wire_of(
            &LabelBuf::from_presentation(text.as_bytes()).expect("valid"),
            &mut v,
        );
        v
    }

    #[test]
    fn wire_and_display_round_trip() {
        let cases = [
            ("WWW.Example.COM", "www.example.com."),
            ("www.example.com.", "www.example.com."),
            (".", "."),
            ("a\\.b.Example.com", "a\\.b.example.com."),
            ("a\\046b.c", "a\\.b.c."),
            ("a\\000b.c", "a\\000b.c."),
            ("\\200\\\\x.", "\\200\\\\x."),
            ("sp\\ ace.x", "sp\\032ace.x."),
        ];
        for (text, want) in cases {
            let w = wire(text);
            assert!(is_valid_wire(&w), "{text}");
            assert_eq!(display(&w), want, "{text}");
            assert_eq!(wire(want), w, "{want} reads back to the same bytes");
        }
        assert_eq!(wire("a.b"), vec![1, b'a', 1, b'b']);
        for (text, _) in cases {
            let mut fast = vec![7u8];
            wire_from_presentation(text.as_bytes(), &mut fast).expect("valid");
            assert_eq!(fast[1..], wire(text)[..], "{text}");
        }
    }

    #[test]
    fn presentation_errors_match_labelbuf() {
        let long = format!("{}.com", "a".repeat(64));
        let too_long = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(62));
        // 3 * (1 + 63) + (1 + 61) = 254 wire bytes, 255 with the root: the longest name.
        let max = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        for text in [
            "",
            "a..b",
            ".a",
            "a.b..",
            &long,
            &too_long,
            "a\\",
            "x\\999.com",
        ] {
            let mut out = vec![1u8, 2];
            let got = wire_from_presentation(text.as_bytes(), &mut out);
            let want = LabelBuf::from_presentation(text.as_bytes());
            assert_eq!(got.err(), want.err(), "{text:?}");
            assert_eq!(out, vec![1u8, 2], "nothing appended for {text:?}");
        }
        let mut out = Vec::new();
        wire_from_presentation(max.as_bytes(), &mut out).expect("254 wire bytes fit");
        assert_eq!(out.len(), 254);
        assert_eq!(out, wire(&max));
    }

    #[test]
    fn invalid_wire() {
        for bad in [&[0u8, 1][..], &[2, b'a'], &[64], &[1, b'A']] {
            assert!(!is_valid_wire(bad), "{bad:?}");
        }
        assert!(!is_valid_wire(&[1u8; 255]));
    }

    #[test]
    fn intern_release_compact() {
        let h = DefaultHashBuilder::default();
        let mut n = Names::default();
        let mut ids = Vec::new();
        for i in 0..20_000 {
            let w = wire(&format!("host{i}.example.com"));
            let id = n.intern(&h, &w).expect("room");
            n.retain(id);
            assert_eq!(n.intern(&h, &w).expect("room"), id, "same bytes, same id");
            ids.push((id, w));
        }
        assert_eq!(n.len(), 20_000);
        // Free every other name: enough garbage to compact, and the rest must survive it.
        for (id, _) in ids.iter().step_by(2) {
            n.release(&h, *id);
        }
        assert_eq!(n.len(), 10_000);
        assert!(n.arena.len() < 20_000 * 17, "compacted: {}", n.arena.len());
        for (id, w) in ids.iter().skip(1).step_by(2) {
            assert_eq!(n.bytes(*id), &w[..]);
            assert_eq!(n.find(&h, w), Some(*id));
        }
        for (_, w) in ids.iter().step_by(2) {
            assert_eq!(n.find(&h, w), None);
        }
    }
}
