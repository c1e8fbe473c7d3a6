//! Builders: an error response for a query, and the in-place id rewrite.

use super::error::{WireError, WireErrorKind};
use super::message::{walk, Header, Question};
use super::types;

/// UDP payload size advertised in the OPT of responses we build (the DNS Flag Day 2020 value,
/// small enough to avoid IP fragmentation).
pub const EDNS_UDP_SIZE: u16 = 1232;

/// Rewrites the 16-bit message id in place (the proxy's upstream ids), without re-encoding.
pub fn set_id(packet: &mut [u8], id: u16) -> Result<(), WireError> {
    let len = packet.len();
    match packet.get_mut(..2) {
        Some(b) if len >= 12 => {
            b.copy_from_slice(&id.to_be_bytes());
            Ok(())
        }
        _ => Err(WireError::new(WireErrorKind::ShortHeader { len }, 0)),
    }
}

/// Appends to `out` the error response to `query`: same id and opcode, QR set, RD copied, the
/// question copied (uncompressed), `rcode` (0..=4095; above 15 the upper bits go in the OPT), and
/// an OPT record (payload [`EDNS_UDP_SIZE`], version 0, DO copied per RFC 3225) if the query had
/// one. The query must be well formed, have QR clear and at most one question.
pub fn error_response(query: &[u8], rcode: u16, out: &mut Vec<u8>) -> Result<(), WireError> {
    if rcode > 0xfff {
        return Err(bad_rcode(rcode.into()));
    }
    let header = Header::parse(query)?;
    if header.qr() {
        return Err(WireError::new(WireErrorKind::NotAQuery, 2));
    }
    if header.qdcount > 1 {
        return Err(WireError::new(
            WireErrorKind::QuestionCount {
                count: header.qdcount,
            },
            4,
        ));
    }
    let mut question: Option<Question<'_>> = None;
    let walked = walk(query, |q| question = Some(q), |_, _| {})?;
    if rcode > 0xf && walked.edns.is_none() {
        return Err(bad_rcode(rcode.into()));
    }
    // QR, opcode, RD copied, rcode; AA, TC, RA, AD, CD clear.
    let flags = 0x8000 | (header.flags & 0x7900) | (rcode & 0xf);
    let ar: u16 = walked.edns.is_some().into();
    let qd: u16 = question.is_some().into();
    out.reserve(12 + 260 + 11);
    for w in [header.id, flags, qd, 0, 0, ar] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    if let Some(q) = question {
        q.name.write_wire(out);
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&q.qclass.to_be_bytes());
    }
    if let Some(e) = walked.edns {
        out.push(0); // root owner
        out.extend_from_slice(&types::OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
        let ttl = u32::from(rcode >> 4) << 24 | u32::from(e.flags & 0x8000);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    Ok(())
}

/// The error for an rcode that cannot be sent (outside 0..=4095, or above 15 without OPT).
pub fn bad_rcode(rcode: i64) -> WireError {
    WireError::new(WireErrorKind::BadRcode { rcode }, 0)
}
