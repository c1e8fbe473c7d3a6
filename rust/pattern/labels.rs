//! A DNS name prepared for matching: labels lower-cased (ASCII only, RFC 4343) into one fixed
//! buffer, leaf first, with their boundaries kept. No heap allocation.

use super::error::{PatternError, PatternErrorKind, Source};

/// Most labels a name can have within 255 wire bytes (127 one-byte labels and the root).
const MAX_LABELS: usize = 127;
/// RFC 1035 2.3.4.
const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 255;

/// `[-a-z0-9_]`: what Cilium's wildcards may stand for (after lower-casing).
pub(crate) const fn is_hostname_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// Per byte: its ASCII lower case, and 1 when it falls outside `[-a-z0-9_]` after lowering.
const BYTE_TABLE: [(u8, u8); 256] = {
    let mut t = [(0u8, 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let lower = (i as u8).to_ascii_lowercase();
        t[i] = (lower, if is_hostname_byte(lower) { 0 } else { 1 });
        i += 1;
    }
    t
};

/// A name's labels, lower-cased, leaf first.
#[derive(Clone)]
pub struct LabelBuf {
    bytes: [u8; MAX_NAME],
    ends: [u8; MAX_LABELS],
    count: usize,
    used: usize,
    /// Bit `i` set when label `i` (from the leaf) holds a byte outside `[-a-z0-9_]`.
    unusual: u128,
}

impl std::fmt::Debug for LabelBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries((0..self.count).map(|i| self.label(i).escape_ascii().to_string()))
            .finish()
    }
}

impl Default for LabelBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl LabelBuf {
    /// The root name (no labels).
    pub fn new() -> Self {
        LabelBuf {
            bytes: [0; MAX_NAME],
            ends: [0; MAX_LABELS],
            count: 0,
            used: 0,
            unusual: 0,
        }
    }

    /// Back to the root name (no labels), keeping the storage.
    pub fn clear(&mut self) {
        self.count = 0;
        self.used = 0;
        self.unusual = 0;
    }

    /// Number of labels (0 for the root).
    pub fn len(&self) -> usize {
        self.count
    }

    /// True for the root name.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Label `i`, counting from the leaf (0) towards the root.
    pub fn label(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }

    /// True when labels `0..n` (leaf side) hold only `[-a-z0-9_]`, as a `**.` prefix requires.
    pub fn usual_below(&self, n: usize) -> bool {
        self.unusual & below(n) == 0
    }

    /// Wire length of the name: each label with its length byte, plus the root byte.
    pub fn wire_len(&self) -> usize {
        self.used + self.count + 1
    }

    /// Appends the next label (towards the root), lower-casing it. False, and nothing appended,
    /// when the label is empty or longer than 63 bytes, or the name would pass 255 wire bytes.
    pub fn push_label(&mut self, label: &[u8]) -> bool {
        if label.is_empty()
            || label.len() > MAX_LABEL
            || self.wire_len() + 1 + label.len() > MAX_NAME
            || self.count == MAX_LABELS
        {
            return false;
        }
        let dst = &mut self.bytes[self.used..self.used + label.len()];
        let mut unusual = 0u8;
        for (d, &s) in dst.iter_mut().zip(label) {
            let (lower, odd) = BYTE_TABLE[s as usize];
            *d = lower;
            unusual |= odd;
        }
        self.unusual |= u128::from(unusual) << self.count;
        self.used += label.len();
        self.ends[self.count] = self.used as u8;
        self.count += 1;
        true
    }

    /// Builds from wire labels given leaf first. None when a label or the whole is too long.
    pub fn from_labels<'a, I: IntoIterator<Item = &'a [u8]>>(labels: I) -> Option<Self> {
        let mut buf = LabelBuf::new();
        for l in labels {
            if !buf.push_label(l) {
                return None;
            }
        }
        Some(buf)
    }

    /// Parses a name in presentation form (RFC 1035 5.1): labels separated by `.`, a trailing dot
    /// optional, `\X` for a literal character and `\DDD` for a byte. `.` alone is the root.
    pub fn from_presentation(text: &[u8]) -> Result<Self, PatternError> {
        let mut buf = LabelBuf::new();
        buf.parse_presentation(text)?;
        Ok(buf)
    }

    /// [`LabelBuf::from_presentation`] into this buffer (reset first), with no copy of the
    /// buffer: the hot path for names given as text.
    pub fn parse_presentation(&mut self, text: &[u8]) -> Result<(), PatternError> {
        let err = |kind| {
            Err(PatternError::new(
                Source::Name,
                &String::from_utf8_lossy(text),
                kind,
            ))
        };
        if text.is_empty() {
            return err(PatternErrorKind::Empty);
        }
        self.clear();
        let buf = self;
        if text == b"." {
            return Ok(());
        }
        if !text.contains(&b'\\') {
            // The common case: no escapes, so labels are plain slices of the text.
            let body = text.strip_suffix(b".").unwrap_or(text);
            let mut start = 0;
            for part in body.split(|&b| b == b'.') {
                if part.is_empty() {
                    return err(PatternErrorKind::EmptyLabel { pos: start });
                }
                if part.len() > MAX_LABEL {
                    return err(PatternErrorKind::LabelTooLong {
                        pos: start,
                        len: part.len(),
                    });
                }
                if !buf.push_label(part) {
                    return err(PatternErrorKind::NameTooLong {
                        len: buf.wire_len() + 1 + part.len(),
                    });
                }
                start += part.len() + 1;
            }
            return Ok(());
        }
        let mut label = [0u8; MAX_LABEL + 1];
        let mut n = 0;
        let mut label_start = 0;
        let mut i = 0;
        while i <= text.len() {
            let at_end = i == text.len();
            if at_end || text[i] == b'.' {
                if at_end && n == 0 {
                    break; // the optional trailing dot; the label before it was already pushed
                }
                if n == 0 {
                    return err(PatternErrorKind::EmptyLabel { pos: label_start });
                }
                if !buf.push_label(&label[..n]) {
                    return err(PatternErrorKind::NameTooLong {
                        len: buf.wire_len() + 1 + n,
                    });
                }
                n = 0;
                i += 1;
                label_start = i;
                continue;
            }
            let (byte, width) = if text[i] == b'\\' {
                match text.get(i + 1..i + 4) {
                    Some(d) if d.iter().all(u8::is_ascii_digit) => {
                        let v = d.iter().fold(0u32, |acc, c| acc * 10 + u32::from(c - b'0'));
                        match u8::try_from(v) {
                            Ok(b) => (b, 4),
                            Err(_) => return err(PatternErrorKind::BadEscape { pos: i }),
                        }
                    }
                    _ => match text.get(i + 1) {
                        Some(c) if !c.is_ascii_digit() => (*c, 2),
                        _ => return err(PatternErrorKind::BadEscape { pos: i }),
                    },
                }
            } else {
                (text[i], 1)
            };
            if n == MAX_LABEL {
                return err(PatternErrorKind::LabelTooLong {
                    pos: label_start,
                    len: n + 1,
                });
            }
            label[n] = byte;
            n += 1;
            i += width;
        }
        Ok(())
    }
}

/// Bits `0..n` of a label mask (`n` at most 127).
const fn below(n: usize) -> u128 {
    (1u128 << n) - 1
}

/// A name's labels as the trie reads them: leaf first, lower case, with which ones hold a byte
/// outside `[-a-z0-9_]` (wildcards never match those).
pub trait Labels {
    /// Number of labels (0 for the root).
    fn count(&self) -> usize;
    /// Label `i`, counting from the leaf (0) towards the root.
    fn label(&self, i: usize) -> &[u8];
    /// True when labels `0..n` hold only `[-a-z0-9_]`.
    fn usual_below(&self, n: usize) -> bool;
    /// True when label `i` holds only `[-a-z0-9_]`.
    fn usual(&self, i: usize) -> bool;
    /// [`ShortKey`] of label `i`.
    fn short_key(&self, i: usize) -> Option<ShortKey> {
        short_key(self.label(i))
    }
}

impl Labels for LabelBuf {
    fn count(&self) -> usize {
        self.count
    }
    fn label(&self, i: usize) -> &[u8] {
        LabelBuf::label(self, i)
    }
    fn usual_below(&self, n: usize) -> bool {
        LabelBuf::usual_below(self, n)
    }
    fn usual(&self, i: usize) -> bool {
        self.unusual >> i & 1 == 0
    }
}

/// The key the trie stores a short label under: its bytes zero-padded to 23, then its length,
/// as three little-endian words. None for labels longer than [`SHORT_LABEL`] bytes.
pub type ShortKey = [u64; 3];

/// Longest label with a [`ShortKey`]: 19 bytes, so that a trie slot holds the label in 20
/// bytes beside three node ids (32 in all). Nearly all labels are this short.
pub const SHORT_LABEL: usize = 19;

/// [`ShortKey`] of a label, built in registers (a byte-wise copy into a buffer read back as
/// words would stall on store forwarding).
pub fn short_key(label: &[u8]) -> Option<ShortKey> {
    if label.len() > SHORT_LABEL {
        return None;
    }
    let mut words = [0u64; 3];
    for (w, chunk) in words.iter_mut().zip(label.chunks(8)) {
        *w = match <[u8; 8]>::try_from(chunk) {
            Ok(full) => u64::from_le_bytes(full),
            Err(_) => chunk
                .iter()
                .rev()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        };
    }
    words[2] |= (label.len() as u64) << 56;
    Some(words)
}

const HIGH: u64 = 0x8080_8080_8080_8080;

const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// High bit of each byte of `x` set where `lo <= byte <= hi`; every byte must be below 0x80 (no
/// carry then crosses a byte).
const fn in_range(x: u64, lo: u8, hi: u8) -> u64 {
    (x.wrapping_add(splat(128 - lo)) & !x.wrapping_add(splat(127 - hi))) & HIGH
}

/// A mask of the low `n` bytes of a word (all of them from 8 on).
#[inline(always)]
fn low_bytes(n: usize) -> u64 {
    u64::MAX.checked_shr(64 - 8 * n.min(8) as u32).unwrap_or(0)
}

/// Eight bytes of `text` from `at` as a little-endian word, zero beyond its end; `at` is below
/// `text.len()`.
#[inline(always)]
fn word_at(text: &[u8], at: usize) -> u64 {
    let load = |from: usize| {
        text.get(from..from + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map_or(0, u64::from_le_bytes)
    };
    if at + 8 <= text.len() {
        load(at)
    } else if text.len() >= 8 {
        // The last eight bytes, shifted so that byte `at` comes first.
        load(text.len() - 8) >> (8 * (at + 8 - text.len()))
    } else {
        text[at..]
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// True when `text` holds only `[-a-z0-9_.]`, checked eight bytes at a time.
fn plain(text: &[u8]) -> bool {
    let mut at = 0;
    while at < text.len() {
        let x = word_at(text, at);
        let valid = HIGH & low_bytes(text.len() - at);
        let ok = in_range(x, b'a', b'z')
            | in_range(x, b'0', b'9')
            | in_range(x, b'-', b'.')
            | in_range(x, b'_', b'_');
        if x & valid & HIGH != 0 || ok & valid != valid {
            return false;
        }
        at += 8;
    }
    true
}

/// A name read in place from presentation text that is already in the form [`LabelBuf`] would
/// make of it: ASCII, lower case, no escapes. The labels are slices of the text; nothing is
/// copied. Checked eight bytes at a time.
#[derive(Debug)]
pub struct TextName<'a> {
    text: &'a [u8],
    /// End offset of label `i` in `text`.
    ends: [u8; TEXT_LABELS],
    count: usize,
}

/// Most labels a [`TextName`] holds (names with more go through [`LabelBuf`]): kept small so the
/// view is cheap to make and move.
const TEXT_LABELS: usize = 48;

impl<'a> TextName<'a> {
    /// The labels of `text`, or None when it needs [`LabelBuf::parse_presentation`]: upper
    /// case, escapes, bytes above 0x7f, the root, or anything invalid (which that parser then
    /// reports).
    pub fn new(text: &'a [u8]) -> Option<Self> {
        let mut name = Self::empty();
        name.read(text).then_some(name)
    }

    /// A view of no labels, for [`TextName::read`].
    #[inline(always)]
    pub fn empty() -> Self {
        TextName {
            text: &[],
            ends: [0; TEXT_LABELS],
            count: 0,
        }
    }

    /// Reads `text` into this view in place (a view is 72 bytes: moving one out of an `Option`
    /// cost more than reading the name); false when [`TextName::new`] would give None, and the
    /// view is then to be dropped.
    #[inline(always)]
    pub fn read(&mut self, text: &'a [u8]) -> bool {
        let body = text.strip_suffix(b".").unwrap_or(text);
        // 253 text bytes are 255 in wire form; offsets then fit a byte.
        if body.is_empty() || body.len() > MAX_NAME - 2 {
            return false;
        }
        self.text = body;
        self.count = 0;
        let mut start = 0;
        let mut at = 0;
        while at < body.len() {
            let x = word_at(body, at);
            let valid = HIGH & low_bytes(body.len() - at);
            // Bytes above 0x7f, upper case and escapes need LabelBuf; other bytes outside
            // `[-a-z0-9_]` stay (wildcards never match them: see `plain`).
            if (x | in_range(x, b'A', b'Z') | in_range(x, b'\\', b'\\')) & valid != 0 {
                return false;
            }
            let mut dots = in_range(x, b'.', b'.') & valid;
            while dots != 0 {
                let end = at + dots.trailing_zeros() as usize / 8;
                if !self.end_label(start, end) {
                    return false;
                }
                start = end + 1;
                dots &= dots - 1;
            }
            at += 8;
        }
        self.end_label(start, body.len())
    }

    fn end_label(&mut self, start: usize, end: usize) -> bool {
        if end == start || end - start > MAX_LABEL || self.count == TEXT_LABELS {
            return false;
        }
        // `end` is at most 253.
        self.ends[self.count] = end as u8;
        self.count += 1;
        true
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1] as usize + 1
        }
    }
}

impl Labels for TextName<'_> {
    fn count(&self) -> usize {
        self.count
    }
    fn label(&self, i: usize) -> &[u8] {
        &self.text[self.start(i)..self.ends[i] as usize]
    }
    fn usual_below(&self, n: usize) -> bool {
        n == 0 || plain(&self.text[..self.ends[n - 1] as usize])
    }
    fn usual(&self, i: usize) -> bool {
        plain(self.label(i))
    }
    #[inline(always)]
    fn short_key(&self, i: usize) -> Option<ShortKey> {
        let start = self.start(i);
        let len = self.ends[i] as usize - start;
        if len > SHORT_LABEL {
            return None;
        }
        // Whole words of the text, masked to the label: no byte loop.
        let t = self.text;
        let w0 = word_at(t, start) & low_bytes(len);
        let w1 = if len > 8 {
            word_at(t, start + 8) & low_bytes(len - 8)
        } else {
            0
        };
        let w2 = if len > 16 {
            word_at(t, start + 16) & low_bytes(len - 16)
        } else {
            0
        };
        let mut words = [w0, w1, w2];
        words[2] |= (len as u64) << 56;
        Some(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(b: &LabelBuf) -> Vec<Vec<u8>> {
        (0..b.len()).map(|i| b.label(i).to_vec()).collect()
    }

    #[test]
    fn presentation() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"WWW.Example.COM.", &[b"www", b"example", b"com"]),
            (b"www.example.com", &[b"www", b"example", b"com"]),
            (b".", &[]),
            (b"a\\.b.example.com", &[b"a.b", b"example", b"com"]),
            (b"a\\000b.c", &[b"a\0b", b"c"]),
            (b"\\065\\\\x.", &[b"a\\x"]),
            (b"com", &[b"com"]),
        ];
        for (text, want) in cases {
            let b = LabelBuf::from_presentation(text).expect("valid");
            let want: Vec<Vec<u8>> = want.iter().map(|l| l.to_vec()).collect();
            assert_eq!(labels(&b), want, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn presentation_errors() {
        use PatternErrorKind::*;
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = ["a".repeat(63).as_str(); 4].join(".") + ".b";
        let cases: &[(&[u8], PatternErrorKind)] = &[
            (b"", Empty),
            (b"..", EmptyLabel { pos: 0 }),
            (b".com", EmptyLabel { pos: 0 }),
            (b"a..com", EmptyLabel { pos: 2 }),
            (b"a.com..", EmptyLabel { pos: 6 }),
            (b"a\\", BadEscape { pos: 1 }),
            (b"a\\25", BadEscape { pos: 1 }),
            (b"a\\256", BadEscape { pos: 1 }),
            (long_label.as_bytes(), LabelTooLong { pos: 0, len: 64 }),
            (long_name.as_bytes(), NameTooLong { len: 257 }),
        ];
        for (text, kind) in cases {
            let e = LabelBuf::from_presentation(text).expect_err("invalid");
            assert_eq!(&e.kind, kind, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn limits() {
        let max = ["a".repeat(63).as_str(); 3].join(".") + "." + &"b".repeat(61);
        let b = LabelBuf::from_presentation(max.as_bytes()).expect("253 chars fit");
        assert_eq!(b.wire_len(), 255);
        let mut b = LabelBuf::new();
        for _ in 0..127 {
            assert!(b.push_label(b"x"));
        }
        assert_eq!(b.wire_len(), 255);
        assert!(!b.push_label(b"x"));
        assert!(!LabelBuf::new().push_label(b""));
    }

    /// Everything the trie reads of a name, through the trait.
    fn view(n: &dyn Labels) -> Vec<(Vec<u8>, bool, bool, Option<ShortKey>)> {
        (0..n.count())
            .map(|i| {
                (
                    n.label(i).to_vec(),
                    n.usual(i),
                    n.usual_below(i + 1),
                    n.short_key(i),
                )
            })
            .collect()
    }

    /// TextName reads exactly what LabelBuf parses, or declines (and LabelBuf decides).
    #[test]
    fn text_name_agrees_with_label_buf() {
        let long_label = format!("{}.com", "a".repeat(64));
        let label_63 = format!("{}.com", "b".repeat(63));
        let label_19 = format!("{}.x", "c".repeat(SHORT_LABEL));
        let label_20 = format!("{}.x", "d".repeat(SHORT_LABEL + 1));
        let many = vec!["a"; 60].join(".");
        let max = ["a".repeat(63).as_str(); 3].join(".") + "." + &"b".repeat(61);
        let fixed: Vec<&[u8]> = vec![
            b"www.example.com",
            b"www.example.com.",
            b"a",
            b"a.",
            b"abcdefg.h",
            b"abcdefgh.ijklmnop.qrstuvwx.yz",
            b"a-b_c.d9.e",
            b"a*b.c",
            b"a b.c",
            b"a!.b.c",
            b"x.a\\.b.c",
            b"WWW.example.com",
            b"a..b",
            b".a",
            b"a.b..",
            b".",
            b"",
            "caf\u{e9}.fr".as_bytes(),
            long_label.as_bytes(),
            label_63.as_bytes(),
            label_19.as_bytes(),
            label_20.as_bytes(),
            many.as_bytes(),
            max.as_bytes(),
        ];
        let mut texts: Vec<Vec<u8>> = fixed.iter().map(|t| t.to_vec()).collect();
        // Every short string over a small alphabet that exercises the boundaries.
        let alphabet = b"a.-_*Z\\9";
        for len in 1..=4 {
            let mut idx = vec![0usize; len];
            loop {
                texts.push(idx.iter().map(|&i| alphabet[i]).collect());
                let mut k = 0;
                while k < len {
                    idx[k] += 1;
                    if idx[k] < alphabet.len() {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == len {
                    break;
                }
            }
        }
        let mut read = 0;
        for text in &texts {
            let buf = LabelBuf::from_presentation(text);
            match TextName::new(text) {
                Some(name) => {
                    read += 1;
                    let buf = buf.unwrap_or_else(|e| {
                        panic!(
                            "{}: TextName read what LabelBuf rejects: {e}",
                            text.escape_ascii()
                        )
                    });
                    assert_eq!(view(&name), view(&buf), "{}", text.escape_ascii());
                }
                None => {
                    // Declined: only for what needs the full parser or is invalid.
                    let needs_parser = text
                        .iter()
                        .any(|b| b.is_ascii_uppercase() || *b == b'\\' || !b.is_ascii())
                        || text == b"."
                        || buf.is_err()
                        || buf.as_ref().is_ok_and(|b| b.len() > TEXT_LABELS);
                    assert!(needs_parser, "{} declined", text.escape_ascii());
                }
            }
        }
        assert!(read > 1000, "only {read} texts read in place");
    }
}
