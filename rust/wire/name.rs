//! Domain names inside a message: validation while reading (RFC 1035 4.1.4 compression) and a
//! zero-copy [`Name`] view whose labels are slices of the packet.

use std::fmt;

use super::error::{WireError, WireErrorKind};
use crate::pattern::LabelBuf;

/// Most compression pointers followed in one name. Loops are already impossible (every pointer
/// must go strictly backwards); the cap bounds the work a hostile packet can ask for per name
/// (a 64 KiB packet could otherwise chain thousands of two-byte pointers). dnspython uses 16 too.
pub const MAX_POINTER_HOPS: usize = 16;
const MAX_NAME: usize = 255;

/// A validated name in a packet: where it starts, its wire length once decompressed and its label
/// count. Iterating follows the compression pointers again; no bytes are copied.
#[derive(Clone, Copy)]
pub struct Name<'a> {
    buf: &'a [u8],
    start: u32,
    wire_len: u8,
    labels: u8,
}

/// The result of reading a name: the view and the offset just past it in place.
pub(crate) struct ReadName<'a> {
    pub name: Name<'a>,
    pub end: usize,
}

/// Reads and validates the name at `pos`. `limit` is the end of the region the name sits in (the
/// packet, or the RDATA holding it). `compress` says whether pointers are allowed.
///
/// RFC 1035 4.1.4: a pointer is `11` + a 14-bit offset. We require each pointer to point
/// strictly before the start of the piece of name that holds it, and the piece it points to to
/// end before that start too (the same rule as dnspython): this forbids loops and forward jumps.
pub(crate) fn read_name(
    buf: &[u8],
    pos: usize,
    limit: usize,
    compress: bool,
) -> Result<ReadName<'_>, WireError> {
    let mut p = pos;
    let mut piece_start = pos;
    let mut end = limit.min(buf.len());
    let mut in_place_end = None;
    let mut hops = 0;
    let mut wire_len = 1usize; // the root byte
    let mut labels = 0usize;
    // Where the first label (or the root byte) really is, after any leading pointers: iterating
    // from there is the same walk, and names compressed to the same place get the same start.
    let mut first = None;
    loop {
        let len = match buf.get(p) {
            Some(b) if p < end => *b,
            _ => return Err(WireError::new(WireErrorKind::Truncated { what: "name" }, p)),
        };
        if len < 0xc0 && first.is_none() {
            first = Some(p);
        }
        match len >> 6 {
            0 if len == 0 => {
                p += 1;
                break;
            }
            0 => {
                let len = usize::from(len);
                if p + 1 + len > end {
                    return Err(WireError::new(
                        WireErrorKind::Truncated { what: "label" },
                        p,
                    ));
                }
                wire_len += len + 1;
                if wire_len > MAX_NAME {
                    return Err(WireError::new(WireErrorKind::NameTooLong, pos));
                }
                labels += 1;
                p += 1 + len;
            }
            3 => {
                if !compress {
                    return Err(WireError::new(WireErrorKind::CompressionForbidden, p));
                }
                let lo = match buf.get(p + 1) {
                    Some(b) if p + 1 < end => *b,
                    _ => {
                        return Err(WireError::new(
                            WireErrorKind::Truncated {
                                what: "compression pointer",
                            },
                            p,
                        ))
                    }
                };
                let target = usize::from(len & 0x3f) << 8 | usize::from(lo);
                if in_place_end.is_none() {
                    in_place_end = Some(p + 2);
                }
                if target >= piece_start {
                    return Err(WireError::new(WireErrorKind::BadPointer { target }, p));
                }
                hops += 1;
                if hops > MAX_POINTER_HOPS {
                    return Err(WireError::new(WireErrorKind::TooManyPointers, p));
                }
                // The piece pointed to must lie wholly before the piece holding the pointer.
                end = piece_start;
                piece_start = target;
                p = target;
            }
            _ => return Err(WireError::new(WireErrorKind::BadLabelType { byte: len }, p)),
        }
    }
    // The u8 lengths always fit: a name is at most 255 bytes, so at most 127 labels.
    let name = Name {
        buf,
        start: u32::try_from(first.unwrap_or(pos)).unwrap_or(u32::MAX),
        wire_len: u8::try_from(wire_len).unwrap_or(u8::MAX),
        labels: u8::try_from(labels).unwrap_or(u8::MAX),
    };
    Ok(ReadName {
        name,
        end: in_place_end.unwrap_or(p),
    })
}

/// The labels of a [`Name`], leaf first, as slices of the packet.
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    buf: &'a [u8],
    pos: usize,
    left: u8,
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        // The name was validated when read, so these reads succeed; a failed one ends the walk.
        loop {
            let len = *self.buf.get(self.pos)?;
            if len >= 0xc0 {
                let lo = *self.buf.get(self.pos + 1)?;
                self.pos = usize::from(len & 0x3f) << 8 | usize::from(lo);
                continue;
            }
            let start = self.pos + 1;
            let label = self.buf.get(start..start + usize::from(len))?;
            self.pos = start + usize::from(len);
            self.left -= 1;
            return Some(label);
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

impl<'a> Name<'a> {
    /// Labels leaf first (the root is not yielded).
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            buf: self.buf,
            pos: self.start as usize,
            left: self.labels,
        }
    }

    /// Number of labels (0 for the root).
    pub fn label_count(&self) -> usize {
        usize::from(self.labels)
    }

    /// True for the root name.
    pub fn is_root(&self) -> bool {
        self.labels == 0
    }

    /// Length in uncompressed wire form, root byte included (1..=255).
    pub fn wire_len(&self) -> usize {
        usize::from(self.wire_len)
    }

    /// Offset in the packet of the name's first label (or root byte), after any leading
    /// compression pointers.
    pub fn offset(&self) -> usize {
        self.start as usize
    }

    /// The labels lower-cased into a [`LabelBuf`] for matching; no string is built.
    pub fn to_label_buf(&self) -> LabelBuf {
        let mut out = LabelBuf::new();
        for label in self.labels() {
            // Cannot fail: the name was checked against the same 63 / 255 limits when read.
            if !out.push_label(label) {
                break;
            }
        }
        out
    }

    /// Case-insensitive (ASCII only, RFC 4343) equality of two names, label by label.
    pub fn eq_ignore_case(&self, other: &Name<'_>) -> bool {
        if self.labels != other.labels || self.wire_len != other.wire_len {
            return false;
        }
        // The same bytes of the same packet (common: compressed to the same place).
        if self.start == other.start && std::ptr::eq(self.buf, other.buf) {
            return true;
        }
        self.labels()
            .zip(other.labels())
            .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }

    /// Appends the name uncompressed in wire form.
    pub fn write_wire(&self, out: &mut Vec<u8>) {
        for label in self.labels() {
            out.push(label.len() as u8); // <= 63
            out.extend_from_slice(label);
        }
        out.push(0);
    }

    /// Presentation form exactly as dnspython's `Name.to_text()` prints it: absolute with a
    /// trailing dot, `"().;\@$` escaped with a backslash, bytes outside `0x21..=0x7e` as `\DDD`.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(self.wire_len() + 8);
        self.write_text(&mut s);
        s
    }

    /// [`Name::to_text`] into an existing string.
    pub fn write_text(&self, s: &mut String) {
        if self.labels == 0 {
            s.push('.');
            return;
        }
        for label in self.labels() {
            escape_label(label, s);
            s.push('.');
        }
    }
}

/// Escapes one label for presentation (RFC 1035 5.1, dnspython's choice of characters).
pub fn escape_label(label: &[u8], s: &mut String) {
    for &c in label {
        match c {
            b'"' | b'(' | b')' | b'.' | b';' | b'\\' | b'@' | b'$' => {
                s.push('\\');
                s.push(char::from(c));
            }
            0x21..=0x7e => s.push(char::from(c)),
            _ => {
                s.push('\\');
                s.push(char::from(b'0' + c / 100));
                s.push(char::from(b'0' + c / 10 % 10));
                s.push(char::from(b'0' + c % 10));
            }
        }
    }
}

impl fmt::Debug for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({})", self.to_text())
    }
}

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}
