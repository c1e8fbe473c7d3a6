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
    /// Index of the first label (from the leaf) holding a byte outside `[-a-z0-9_]`.
    first_unusual: usize,
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
            first_unusual: usize::MAX,
        }
    }

    /// Back to the root name (no labels), keeping the storage.
    pub fn clear(&mut self) {
        self.count = 0;
        self.used = 0;
        self.first_unusual = usize::MAX;
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
        self.first_unusual >= n
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
        if unusual != 0 && self.first_unusual == usize::MAX {
            self.first_unusual = self.count;
        }
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
}
