//! The message walker: one validating pass over header, questions and records that every entry
//! point shares ([`Message::parse`], [`super::QueryView`], [`super::resolve`]).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::error::{Section, WireError, WireErrorKind};
use super::name::{read_name, Name};
use super::types;

pub(crate) const HEADER_LEN: usize = 12;

/// The 12-byte header (RFC 1035 4.1.1), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    /// The raw flags word: QR, opcode, AA, TC, RD, RA, Z, AD, CD, rcode.
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    /// Reads the header; the packet must hold at least 12 bytes.
    pub fn parse(buf: &[u8]) -> Result<Header, WireError> {
        let h = buf.get(..HEADER_LEN).ok_or(WireError::new(
            WireErrorKind::ShortHeader { len: buf.len() },
            0,
        ))?;
        let w = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Ok(Header {
            id: w(0),
            flags: w(2),
            qdcount: w(4),
            ancount: w(6),
            nscount: w(8),
            arcount: w(10),
        })
    }

    pub fn qr(&self) -> bool {
        self.flags & 0x8000 != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    pub fn aa(&self) -> bool {
        self.flags & 0x0400 != 0
    }
    pub fn tc(&self) -> bool {
        self.flags & 0x0200 != 0
    }
    pub fn rd(&self) -> bool {
        self.flags & 0x0100 != 0
    }
    pub fn ra(&self) -> bool {
        self.flags & 0x0080 != 0
    }
    pub fn ad(&self) -> bool {
        self.flags & 0x0020 != 0
    }
    pub fn cd(&self) -> bool {
        self.flags & 0x0010 != 0
    }
    /// The low four rcode bits carried in the header.
    pub fn header_rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// A question: name, type, class.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub name: Name<'a>,
    pub qtype: u16,
    pub qclass: u16,
}

/// Decoded RDATA. Names and strings are views into the packet.
#[derive(Debug, Clone, Copy)]
pub enum RData<'a> {
    /// Class IN only (RFC 1035 3.4.1); in other classes A is kept as [`RData::Other`].
    A(Ipv4Addr),
    /// Class IN only (RFC 3596 2.2).
    Aaaa(Ipv6Addr),
    Cname(Name<'a>),
    Dname(Name<'a>),
    Ns(Name<'a>),
    Ptr(Name<'a>),
    Mx {
        preference: u16,
        exchange: Name<'a>,
    },
    Soa {
        mname: Name<'a>,
        rname: Name<'a>,
        serial: u32,
        refresh: u32,
        retry: u32,
        expire: u32,
        minimum: u32,
    },
    /// One or more character-strings (validated); iterate with [`TxtStrings`].
    Txt(TxtStrings<'a>),
    /// Class IN only (RFC 2782).
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Name<'a>,
    },
    /// Any other type (or class), as the raw RDATA.
    Other(&'a [u8]),
}

/// The character-strings of a TXT record (already validated), each without its length byte.
#[derive(Debug, Clone, Copy)]
pub struct TxtStrings<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for TxtStrings<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.data.split_first()?;
        let s = rest.get(..usize::from(len))?;
        self.data = &rest[s.len()..];
        Some(s)
    }
}

/// A resource record. `ttl` is already clamped: RFC 2181 8 says a TTL with the top bit set is
/// treated as zero.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub name: Name<'a>,
    pub rtype: u16,
    pub rclass: u16,
    pub ttl: u32,
    pub rdata: RData<'a>,
}

/// The OPT pseudo-record (RFC 6891 6.1.2), decoded.
#[derive(Debug, Clone, Copy)]
pub struct Edns<'a> {
    /// Requestor's UDP payload size (the OPT record's CLASS).
    pub udp_size: u16,
    /// The upper 8 bits of the 12-bit extended rcode.
    pub ext_rcode: u8,
    pub version: u8,
    /// The 16 flag bits; DO is the top one.
    pub flags: u16,
    /// The options area, validated as a sequence of (code, length, data).
    pub options: EdnsOptions<'a>,
}

impl Edns<'_> {
    /// The DNSSEC OK bit (RFC 3225).
    pub fn dnssec_ok(&self) -> bool {
        self.flags & 0x8000 != 0
    }
}

/// EDNS options as `(code, data)`, views into the packet.
#[derive(Debug, Clone, Copy)]
pub struct EdnsOptions<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for EdnsOptions<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let head = self.data.get(..4)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = self.data.get(4..4 + len)?;
        self.data = &self.data[4 + len..];
        Some((code, value))
    }
}

/// What one pass over a packet found besides the items handed to the callbacks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Walked<'a> {
    pub header: Header,
    pub edns: Option<Edns<'a>>,
    /// Offset just past the question section.
    pub questions_end: usize,
}

/// Reads a big-endian u16 / u32 within `limit`.
fn u16_at(buf: &[u8], p: usize, limit: usize, what: &'static str) -> Result<u16, WireError> {
    match buf.get(p..p + 2) {
        Some(b) if p + 2 <= limit => Ok(u16::from_be_bytes([b[0], b[1]])),
        _ => Err(WireError::new(WireErrorKind::Truncated { what }, p)),
    }
}

fn u32_at(buf: &[u8], p: usize, limit: usize, what: &'static str) -> Result<u32, WireError> {
    match buf.get(p..p + 4) {
        Some(b) if p + 4 <= limit => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        _ => Err(WireError::new(WireErrorKind::Truncated { what }, p)),
    }
}

/// The decoder for one record's RDATA, which must occupy exactly `start..end`.
fn read_rdata<'a>(
    buf: &'a [u8],
    rtype: u16,
    rclass: u16,
    start: usize,
    end: usize,
) -> Result<RData<'a>, WireError> {
    let raw = &buf[start..end]; // the caller checked end <= buf.len()
    let mismatch = |consumed: usize| {
        WireError::new(
            WireErrorKind::RdataLength {
                rtype,
                rdlength: (end - start) as u16,
                consumed,
            },
            start,
        )
    };
    // A name that must end exactly at the RDATA end.
    let last_name = |p: usize, compress: bool| -> Result<Name<'a>, WireError> {
        let r = read_name(buf, p, end, compress)?;
        if r.end != end {
            return Err(mismatch(r.end - start));
        }
        Ok(r.name)
    };
    let rdata = match (rtype, rclass) {
        (types::A, types::CLASS_IN) => match <[u8; 4]>::try_from(raw) {
            Ok(a) => RData::A(Ipv4Addr::from(a)),
            Err(_) => return Err(mismatch(4)),
        },
        (types::AAAA, types::CLASS_IN) => match <[u8; 16]>::try_from(raw) {
            Ok(a) => RData::Aaaa(Ipv6Addr::from(a)),
            Err(_) => return Err(mismatch(16)),
        },
        // RFC 3597 4: compression stays allowed in the RFC 1035 types (and is decoded in SRV,
        // as RFC 3597 asks receivers to); RFC 6672 2.5: a DNAME target MUST NOT be compressed.
        (types::CNAME, _) => RData::Cname(last_name(start, true)?),
        (types::NS, _) => RData::Ns(last_name(start, true)?),
        (types::PTR, _) => RData::Ptr(last_name(start, true)?),
        (types::DNAME, _) => RData::Dname(last_name(start, false)?),
        (types::MX, _) => RData::Mx {
            preference: u16_at(buf, start, end, "MX preference")?,
            exchange: last_name(start + 2, true)?,
        },
        (types::SRV, types::CLASS_IN) => RData::Srv {
            priority: u16_at(buf, start, end, "SRV priority")?,
            weight: u16_at(buf, start + 2, end, "SRV weight")?,
            port: u16_at(buf, start + 4, end, "SRV port")?,
            target: last_name(start + 6, true)?,
        },
        (types::SOA, _) => {
            let m = read_name(buf, start, end, true)?;
            let r = read_name(buf, m.end, end, true)?;
            let p = r.end;
            let field = |i: usize| u32_at(buf, p + 4 * i, end, "SOA field");
            let soa = RData::Soa {
                mname: m.name,
                rname: r.name,
                serial: field(0)?,
                refresh: field(1)?,
                retry: field(2)?,
                expire: field(3)?,
                minimum: field(4)?,
            };
            if p + 20 != end {
                return Err(mismatch(p + 20 - start));
            }
            soa
        }
        (types::TXT, _) => {
            if raw.is_empty() {
                return Err(WireError::new(WireErrorKind::EmptyTxt, start));
            }
            let mut p = 0;
            while p < raw.len() {
                p += 1 + usize::from(raw[p]);
            }
            if p != raw.len() {
                return Err(WireError::new(
                    WireErrorKind::Truncated {
                        what: "TXT character-string",
                    },
                    start,
                ));
            }
            RData::Txt(TxtStrings { data: raw })
        }
        _ => RData::Other(raw),
    };
    Ok(rdata)
}

/// Validates the OPT record's RDATA as options and builds the view.
fn read_opt<'a>(
    buf: &'a [u8],
    rclass: u16,
    ttl: u32,
    start: usize,
    end: usize,
) -> Result<Edns<'a>, WireError> {
    let mut p = start;
    while p < end {
        let len = u16_at(buf, p + 2, end, "EDNS option")?;
        p += 4 + usize::from(len);
        if p > end {
            return Err(WireError::new(
                WireErrorKind::Truncated {
                    what: "EDNS option",
                },
                start,
            ));
        }
    }
    Ok(Edns {
        udp_size: rclass,
        ext_rcode: (ttl >> 24) as u8,
        version: (ttl >> 16) as u8,
        flags: ttl as u16,
        options: EdnsOptions {
            data: &buf[start..end],
        },
    })
}

/// One validating pass over the whole packet. Questions and records (OPT excepted) go to the
/// callbacks in order; nothing is allocated here.
pub(crate) fn walk<'a>(
    buf: &'a [u8],
    mut on_question: impl FnMut(Question<'a>),
    mut on_record: impl FnMut(Section, Record<'a>),
) -> Result<Walked<'a>, WireError> {
    let header = Header::parse(buf)?;
    let len = buf.len();
    let mut p = HEADER_LEN;
    for i in 0..header.qdcount {
        if p >= len {
            return Err(count_error(Section::Question, header.qdcount, i, p));
        }
        let n = read_name(buf, p, len, true)?;
        let qtype = u16_at(buf, n.end, len, "question type")?;
        let qclass = u16_at(buf, n.end + 2, len, "question class")?;
        p = n.end + 4;
        on_question(Question {
            name: n.name,
            qtype,
            qclass,
        });
    }
    let questions_end = p;
    let mut edns = None;
    for (section, count) in [
        (Section::Answer, header.ancount),
        (Section::Authority, header.nscount),
        (Section::Additional, header.arcount),
    ] {
        for i in 0..count {
            if p >= len {
                return Err(count_error(section, count, i, p));
            }
            let rr_start = p;
            let RawRecord {
                name,
                rtype,
                rclass,
                ttl,
                start,
                end,
            } = read_record(buf, p)?;
            p = end;
            if rtype == types::OPT {
                let why = if section != Section::Additional {
                    Some("OPT outside the additional section")
                } else if edns.is_some() {
                    Some("more than one OPT record")
                } else if !name.is_root() {
                    Some("OPT owner name is not the root")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(WireError::new(WireErrorKind::BadOpt { why }, rr_start));
                }
                edns = Some(read_opt(buf, rclass, ttl, start, end)?);
                continue;
            }
            let rdata = read_rdata(buf, rtype, rclass, start, end)?;
            on_record(
                section,
                Record {
                    name,
                    rtype,
                    rclass,
                    ttl: clamp_ttl(ttl),
                    rdata,
                },
            );
        }
    }
    if p != len {
        return Err(WireError::new(
            WireErrorKind::TrailingBytes { count: len - p },
            p,
        ));
    }
    Ok(Walked {
        header,
        edns,
        questions_end,
    })
}

/// RFC 2181 8: a TTL with the most significant bit set is treated as zero.
fn clamp_ttl(ttl: u32) -> u32 {
    if ttl > 0x7fff_ffff {
        0
    } else {
        ttl
    }
}

/// A record's fixed fields and where its RDATA lies, before the RDATA is decoded.
struct RawRecord<'a> {
    name: Name<'a>,
    rtype: u16,
    rclass: u16,
    ttl: u32,
    start: usize,
    end: usize,
}

fn read_record(buf: &[u8], p: usize) -> Result<RawRecord<'_>, WireError> {
    let len = buf.len();
    let n = read_name(buf, p, len, true)?;
    let q = n.end;
    let rtype = u16_at(buf, q, len, "record type")?;
    let rclass = u16_at(buf, q + 2, len, "record class")?;
    let ttl = u32_at(buf, q + 4, len, "record TTL")?;
    let rdlen = u16_at(buf, q + 8, len, "record RDLENGTH")?;
    let start = q + 10;
    let end = start + usize::from(rdlen);
    if end > len {
        return Err(WireError::new(
            WireErrorKind::Truncated { what: "RDATA" },
            start,
        ));
    }
    Ok(RawRecord {
        name: n.name,
        rtype,
        rclass,
        ttl,
        start,
        end,
    })
}

fn count_error(section: Section, claimed: u16, found: u16, at: usize) -> WireError {
    WireError::new(
        WireErrorKind::CountTooLarge {
            section,
            claimed,
            found,
        },
        at,
    )
}

/// A whole message: header, sections and EDNS, every name and string a view into the packet.
/// This allocates the four section vectors; the hot path uses [`super::QueryView`] and
/// [`super::resolve`] instead, which allocate nothing per record.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub header: Header,
    pub questions: Vec<Question<'a>>,
    pub answers: Vec<Record<'a>>,
    pub authority: Vec<Record<'a>>,
    /// The additional section without the OPT record, which is in [`Message::edns`].
    pub additional: Vec<Record<'a>>,
    pub edns: Option<Edns<'a>>,
}

impl<'a> Message<'a> {
    /// Parses and validates a whole message.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, WireError> {
        let mut questions = Vec::new();
        let mut answers = Vec::new();
        let mut authority = Vec::new();
        let mut additional = Vec::new();
        let walked = walk(
            buf,
            |q| questions.push(q),
            |section, r| match section {
                Section::Answer => answers.push(r),
                Section::Authority => authority.push(r),
                _ => additional.push(r),
            },
        )?;
        Ok(Message {
            header: walked.header,
            questions,
            answers,
            authority,
            additional,
            edns: walked.edns,
        })
    }

    /// The full rcode: the header's four bits plus the EDNS extension (RFC 6891 6.1.3).
    pub fn rcode(&self) -> u16 {
        full_rcode(&self.header, self.edns.as_ref())
    }
}

pub(crate) fn full_rcode(header: &Header, edns: Option<&Edns<'_>>) -> u16 {
    let ext = edns.map_or(0, |e| u16::from(e.ext_rcode));
    ext << 4 | u16::from(header.header_rcode())
}
