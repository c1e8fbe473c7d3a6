//! Names as the cache stores them, and the (endpoint, name) groups that hold them.
//!
//! A name is kept in **wire form without the root byte**: each label preceded by its length,
//! leaf first, lower-cased (ASCII only, RFC 4343) by [`LabelBuf`]. That form is exact for every
//! name DNS can carry: a `.` inside a label, a zero byte or a non-ASCII byte stays one byte of one
//! label and never changes the label boundaries, and two spellings of one name (`A.b` and `a.B.`,
//! `a\.b` and `a\046b`) give the same bytes. Names leave the cache in presentation form, absolute
//! (trailing dot), with RFC 1035 section 5.1 escapes for `.`, `\` and bytes outside `!`..`~`, so
//! [`LabelBuf::from_presentation`] reads back exactly the stored bytes.
//!
//! The bytes live in one arena (`Vec<u8>`), each name once, behind a length byte; the groups
//! (endpoint, name) that hold a name point at it (see [`Names`]). Freed space is reclaimed by compacting the arena in place when an eighth of it is garbage,
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
/// (`a.bc` -> `1 a 2 b c`). False, with nothing appended, for anything else. Eight bytes at a
/// time: the names of a batch are most of the work of reading it.
fn wire_plain(text: &[u8], out: &mut Vec<u8>) -> bool {
    let body = text.strip_suffix(b".").unwrap_or(text);
    // Wire length with the root byte: every label plus its length byte, plus one.
    if body.is_empty() || body.len() + 2 > MAX_WIRE {
        return false;
    }
    let start = out.len();
    out.reserve(body.len() + 8);
    out.push(0);
    // Where the current label starts, in `body`; its length byte goes to `out[start + len_at]`
    // (the first label's to the byte pushed above, the others' where their dot was).
    let mut len_at = 0usize;
    let full = body.len() / 8 * 8;
    let mut k = 0;
    while k < body.len() {
        let x = if k < full {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(&body[k..k + 8]);
            u64::from_le_bytes(buf)
        } else {
            // The last few bytes, padded with zeros (which match neither byte below).
            let mut buf = [0u8; 8];
            for (d, &b) in buf.iter_mut().zip(&body[k..]) {
                *d = b;
            }
            u64::from_le_bytes(buf)
        };
        // All eight bytes, the padding too: cut off after the loop.
        out.extend_from_slice(&lower8(x).to_le_bytes());
        if bytes_equal(x, b'\\') != 0 {
            out.truncate(start);
            return false;
        }
        let mut dots = bytes_equal(x, b'.');
        while dots != 0 {
            let at = k + (dots.trailing_zeros() / 8) as usize;
            let n = at - len_at;
            if n == 0 || n > MAX_LABEL {
                out.truncate(start);
                return false;
            }
            out[start + len_at] = n as u8;
            len_at = at + 1;
            dots &= dots - 1;
        }
        k += 8;
    }
    out.truncate(start + 1 + body.len());
    let n = body.len() - len_at;
    if n == 0 || n > MAX_LABEL {
        out.truncate(start);
        return false;
    }
    out[start + len_at] = n as u8;
    true
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The top bit of each byte of `x` that equals `c`, and no other bit.
fn bytes_equal(x: u64, c: u8) -> u64 {
    let v = x ^ (LO * u64::from(c));
    // A byte's top bit ends up set when its low seven bits or its top bit are: not zero.
    !((((v & !HI) + !HI) | v) & HI) & HI
}

/// `x` with each byte in `A`..=`Z` lower-cased, the others unchanged.
fn lower8(x: u64) -> u64 {
    let low7 = x & !HI;
    // No carry crosses a byte: low7 <= 0x7f, plus at most 0x3f.
    let at_least_a = low7 + LO * u64::from(0x80 - b'A');
    let above_z = low7 + LO * u64::from(0x80 - b'Z' - 1);
    let upper = at_least_a & !above_z & !x & HI;
    x | (upper >> 2)
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

/// Marks a free group (in `off`) and ends a chain or the free list (in `next`).
const NIL: u32 = u32::MAX;

/// One (endpoint, name) group, 20 bytes: the entries an endpoint holds for a name.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub ep: u32,
    /// Number of entries.
    pub count: u32,
    /// First entry (the store's list), or the store's `NIL`.
    pub head: u32,
    /// Where the name sits in the arena (a length byte, then the bytes); `NIL` marks a free
    /// group. Every group of one name has the same offset.
    off: u32,
    /// Next group of the same name (another endpoint), or next free group.
    next: u32,
}

/// The (endpoint, name) groups and their names. Each name is stored once, in the arena; the
/// groups of one name form a chain, and the hash index, keyed by the name's bytes, holds the
/// chain's first group. So finding (endpoint, name) is one probe and a short walk (one step per
/// endpoint that resolved the name), and there is no separate name table or name id.
#[derive(Debug, Default)]
pub struct Names {
    arena: Vec<u8>,
    pub(super) groups: Vec<Group>,
    free: Option<u32>,
    live: usize,
    map: HashTable<u32>,
    garbage: usize,
    /// Times the arena was compacted: name keys ([`Names::name_key`]) hold between two.
    compactions: u64,
}

impl Names {
    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of live groups.
    pub fn groups_len(&self) -> usize {
        self.live
    }

    pub fn is_live(&self, g: u32) -> bool {
        self.groups[g as usize].off != NIL
    }

    /// The name of group `g`, in wire form.
    pub fn bytes(&self, g: u32) -> &[u8] {
        at(&self.arena, self.groups[g as usize].off)
    }

    /// A number that two live groups share exactly when they hold the same name. It holds
    /// until the arena is compacted ([`Names::compactions`] changes).
    pub fn name_key(&self, g: u32) -> u32 {
        self.groups[g as usize].off
    }

    /// Times the arena was compacted so far.
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// Number of group slots, live or free.
    pub fn group_slots(&self) -> usize {
        self.groups.len()
    }

    fn head_hashed(&self, h: u64, bytes: &[u8]) -> Option<u32> {
        let (arena, groups) = (&self.arena, &self.groups);
        self.map
            .find(h, |&g| at(arena, groups[g as usize].off) == bytes)
            .copied()
    }

    /// The groups holding the name `bytes` (one per endpoint), in no particular order.
    pub fn chain(&self, hasher: &DefaultHashBuilder, bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut g = self
            .head_hashed(hasher.hash_one(bytes), bytes)
            .unwrap_or(NIL);
        while g != NIL {
            out.push(g);
            g = self.groups[g as usize].next;
        }
        out
    }

    /// The group of (`ep`, `bytes`), made (with no entries) when new; true when made.
    pub fn get_or_insert(
        &mut self,
        hasher: &DefaultHashBuilder,
        ep: u32,
        bytes: &[u8],
    ) -> Result<(u32, bool), CacheError> {
        let h = hasher.hash_one(bytes);
        let head = self.head_hashed(h, bytes);
        if let Some(head) = head {
            let mut g = head;
            while g != NIL {
                if self.groups[g as usize].ep == ep {
                    return Ok((g, false));
                }
                g = self.groups[g as usize].next;
            }
            // Another endpoint's name: share its bytes, second in the chain.
            let hr = self.groups[head as usize];
            let g = self.alloc(Group {
                ep,
                count: 0,
                head: NIL,
                off: hr.off,
                next: hr.next,
            });
            self.groups[head as usize].next = g;
            return Ok((g, true));
        }
        // Callers pass names of at most 254 bytes (`is_valid_wire`).
        let len = bytes.len().min(254);
        if self.arena.len() + 1 + len >= NIL as usize {
            self.compact();
            if self.arena.len() + 1 + len >= NIL as usize {
                return Err(CacheError::NamesFull);
            }
        }
        if self.map.len() == self.map.capacity() {
            self.rebuild_index(hasher);
        }
        let off = self.arena.len() as u32;
        self.arena.push(len as u8);
        self.arena.extend_from_slice(&bytes[..len]);
        let g = self.alloc(Group {
            ep,
            count: 0,
            head: NIL,
            off,
            next: NIL,
        });
        let (arena, groups) = (&self.arena, &self.groups);
        self.map.insert_unique(h, g, |&i| {
            hasher.hash_one(at(arena, groups[i as usize].off))
        });
        Ok((g, true))
    }

    /// Makes room in the index for more names (see [`rebuild_index`](fn@rebuild_index)): reads the groups and the
    /// arena in order, where the index's own growth would read them in hash order, at random.
    fn rebuild_index(&mut self, hasher: &DefaultHashBuilder) {
        // A group that some other group's `next` points at is not first in its chain.
        let mut later = vec![0u64; self.groups.len().div_ceil(64)];
        for g in &self.groups {
            if g.off != NIL && g.next != NIL {
                let n = g.next as usize;
                later[n / 64] |= 1 << (n % 64);
            }
        }
        let (arena, groups) = (&self.arena, &self.groups);
        rebuild_index(
            &mut self.map,
            groups
                .iter()
                .enumerate()
                .filter(|&(i, g)| g.off != NIL && later[i / 64] & (1 << (i % 64)) == 0)
                .map(|(i, g)| (hasher.hash_one(at(arena, g.off)), i as u32)),
            |&i| hasher.hash_one(at(arena, groups[i as usize].off)),
        );
    }

    fn alloc(&mut self, rec: Group) -> u32 {
        self.live += 1;
        match self.free {
            Some(g) => {
                let next = self.groups[g as usize].next;
                self.free = (next != NIL).then_some(next);
                self.groups[g as usize] = rec;
                g
            }
            None => {
                self.groups.push(rec);
                (self.groups.len() - 1) as u32
            }
        }
    }

    /// Frees group `g`; its name goes with the last group holding it.
    pub fn remove(&mut self, hasher: &DefaultHashBuilder, g: u32) {
        let r = self.groups[g as usize];
        let h = hasher.hash_one(at(&self.arena, r.off));
        let groups = &self.groups;
        if let Ok(mut slot) = self.map.find_entry(h, |&i| groups[i as usize].off == r.off) {
            let head = *slot.get();
            if head == g {
                if r.next == NIL {
                    slot.remove();
                    self.garbage += 1 + at(&self.arena, r.off).len();
                } else {
                    *slot.get_mut() = r.next;
                }
            } else {
                let mut p = head;
                while p != NIL && self.groups[p as usize].next != g {
                    p = self.groups[p as usize].next;
                }
                if p != NIL {
                    self.groups[p as usize].next = r.next;
                }
            }
        }
        self.groups[g as usize] = Group {
            ep: 0,
            count: 0,
            head: NIL,
            off: NIL,
            next: self.free.unwrap_or(NIL),
        };
        self.free = Some(g);
        self.live -= 1;
        if self.garbage > 64 * 1024 && self.garbage * 8 >= self.arena.len() {
            self.compact();
        }
    }

    /// Moves the live names to the front of the arena, in place, in offset order. The arena is
    /// taken in four windows, each listing and sorting only its own names: the scratch list is
    /// a quarter of the names, which matters because the allocator keeps a freed big block
    /// (glibc raises its mmap threshold after freeing one) and the process would hold it for good.
    fn compact(&mut self) {
        const WINDOWS: usize = 4;
        let end = self.arena.len();
        let step = end / WINDOWS + 1;
        let mut to = 0u32;
        // (offset, first group) in one u64, so the sort compares plain integers.
        let mut live: Vec<u64> = Vec::new();
        for w in 0..WINDOWS {
            let window = (w * step) as u64..((w + 1) * step).min(end) as u64;
            live.clear();
            live.extend(self.map.iter().filter_map(|&g| {
                let off = u64::from(self.groups[g as usize].off);
                window.contains(&off).then_some((off << 32) | u64::from(g))
            }));
            live.sort_unstable();
            for &key in &live {
                let (off, head) = ((key >> 32) as u32, key as u32);
                let len = 1 + u32::from(self.arena[off as usize]);
                self.arena
                    .copy_within(off as usize..(off + len) as usize, to as usize);
                let mut g = head;
                while g != NIL {
                    self.groups[g as usize].off = to;
                    g = self.groups[g as usize].next;
                }
                to += len;
            }
        }
        self.arena.truncate(to as usize);
        self.garbage = 0;
        self.compactions += 1;
    }

    pub fn memory(&self) -> usize {
        self.arena.capacity()
            + self.groups.capacity() * std::mem::size_of::<Group>()
            + self.map.allocation_size()
    }
}

/// Replaces a full `map` with one that has room for an eighth more than its items, holding
/// `items` (hash, value): every live item, read in whatever order is cheapest for the caller
/// (records in memory order). At the same size when removals left the old one full of
/// tombstones, so a table at a steady number of items keeps its size. `rehash` is only there
/// for the table's API: with the room reserved up front it is not called.
pub(super) fn rebuild_index(
    map: &mut HashTable<u32>,
    items: impl Iterator<Item = (u64, u32)>,
    rehash: impl Fn(&u32) -> u64,
) {
    let want = map.len() + map.len() / 8 + 1;
    let mut new = HashTable::with_capacity(want);
    for (h, v) in items {
        new.insert_unique(h, v, &rehash);
    }
    *map = new;
}

/// The name stored at `off`: a length byte, then the bytes.
fn at(arena: &[u8], off: u32) -> &[u8] {
    let off = off as usize;
    let len = usize::from(arena[off]);
    &arena[off + 1..off + 1 + len]
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

    /// The group of (`ep`, `bytes`), if any.
    pub(crate) fn find(&self, hasher: &DefaultHashBuilder, ep: u32, bytes: &[u8]) -> Option<u32> {
        self.chain(hasher, bytes)
            .into_iter()
            .find(|&g| self.groups[g as usize].ep == ep)
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
    fn fast_path_matches_labelbuf_on_random_text() {
        let alphabet = b"aZz.-_\\0\x80@[`{A";
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for _ in 0..20_000 {
            let len = next(80) as usize;
            let mut text: Vec<u8> = (0..len)
                .map(|_| alphabet[next(alphabet.len() as u64) as usize])
                .collect();
            if next(4) == 0 {
                // Long labels around the 63-byte limit.
                text = [vec![b'q'; 60 + next(8) as usize], text].concat();
            }
            let mut got = vec![7u8];
            let got_res = wire_from_presentation(&text, &mut got);
            let want = LabelBuf::from_presentation(&text);
            assert_eq!(got_res.is_ok(), want.is_ok(), "{text:?}");
            if let Ok(name) = want {
                let mut w = vec![7u8];
                wire_of(&name, &mut w);
                assert_eq!(got, w, "{text:?}");
            } else {
                assert_eq!(got, vec![7u8], "nothing appended for {text:?}");
            }
        }
        for c in 0..=255u8 {
            let x = u64::from_le_bytes([c, b'A', c, b'z', 0, 0x80, c, b'.']);
            let want: Vec<u8> = x.to_le_bytes().iter().map(u8::to_ascii_lowercase).collect();
            assert_eq!(lower8(x).to_le_bytes().to_vec(), want, "{c}");
            let eq: Vec<bool> = x.to_le_bytes().iter().map(|&b| b == c).collect();
            let got: Vec<bool> = (0..8)
                .map(|i| bytes_equal(x, c) >> (i * 8 + 7) & 1 == 1)
                .collect();
            assert_eq!(got, eq, "{c}");
        }
    }

    #[test]
    fn plain_names_take_the_fast_path() {
        for text in [
            "host1.svc1.example.com",
            "A.b.",
            "x",
            "_dns.Sub-Domain.example",
        ] {
            let mut out = vec![9u8];
            assert!(wire_plain(text.as_bytes(), &mut out), "{text}");
            assert_eq!(out[1..], wire(text)[..], "{text}");
        }
        for text in ["a\\.b", ".", "", "a..b", ".a"] {
            let mut out = vec![9u8];
            assert!(!wire_plain(text.as_bytes(), &mut out), "{text}");
            assert_eq!(out, vec![9u8], "nothing appended for {text:?}");
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
    fn groups_share_names_and_compact() {
        let h = DefaultHashBuilder::default();
        let mut n = Names::default();
        let mut ids = Vec::new();
        for i in 0..20_000 {
            let w = wire(&format!("host{i}.example.com"));
            // Endpoints 1 and 2 for every name; 3 for every third one.
            let (a, new) = n.get_or_insert(&h, 1, &w).expect("room");
            assert!(new);
            assert_eq!(n.get_or_insert(&h, 1, &w).expect("room"), (a, false));
            let (b, _) = n.get_or_insert(&h, 2, &w).expect("room");
            let c = (i % 3 == 0).then(|| n.get_or_insert(&h, 3, &w).expect("room").0);
            assert_eq!(n.name_key(a), n.name_key(b), "one copy of the bytes");
            ids.push((a, b, c, w));
        }
        assert_eq!(n.len(), 20_000);
        let arena = n.arena.len();
        // Drop the first group of some chains, the middle of others, every group of half the
        // names: enough garbage to compact, and the rest must survive it.
        for (i, (a, b, c, _)) in ids.iter().enumerate() {
            if i % 2 == 0 {
                n.remove(&h, *a);
                n.remove(&h, *b);
                if let Some(c) = c {
                    n.remove(&h, *c);
                }
            } else if i % 4 == 1 {
                n.remove(&h, *a);
            } else {
                n.remove(&h, *b);
            }
        }
        assert_eq!(n.len(), 10_000);
        assert!(
            n.arena.len() < arena * 5 / 8,
            "compacted: {}",
            n.arena.len()
        );
        for (i, (a, b, c, w)) in ids.iter().enumerate().skip(1).step_by(2) {
            let kept = if i % 4 == 1 { *b } else { *a };
            assert_eq!(n.bytes(kept), &w[..]);
            assert_eq!(n.find(&h, if i % 4 == 1 { 2 } else { 1 }, w), Some(kept));
            assert_eq!(n.find(&h, if i % 4 == 1 { 1 } else { 2 }, w), None);
            assert_eq!(n.find(&h, 3, w), *c);
            if let Some(c) = c {
                assert_eq!(n.bytes(*c), &w[..]);
            }
        }
        for (_, _, _, w) in ids.iter().step_by(2) {
            assert!(n.chain(&h, w).is_empty());
        }
        // Freed groups are reused.
        let before = n.groups.len();
        n.get_or_insert(&h, 9, &wire("new.example.com"))
            .expect("room");
        assert_eq!(n.groups.len(), before);
    }
}
