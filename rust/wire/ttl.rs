//! Capping the TTLs of an answer in place, so that no client caches a record longer than the
//! firewall keeps the addresses it learned from it.

use super::error::{Section, WireError, WireErrorKind};
use super::message::{Header, HEADER_LEN};
use super::name::read_name;
use super::types;

/// The TTL a client may cache a record for: RFC 2181 8 reads a TTL with the top bit set as zero
/// (as [`super::Message`] and [`super::resolve`] do), and nothing goes above `max_ttl`.
pub fn capped_ttl(ttl: u32, max_ttl: u32) -> u32 {
    if ttl > 0x7fff_ffff {
        0
    } else {
        ttl.min(max_ttl)
    }
}

/// Rewrites in place the TTL of every record of `packet` (answer, authority and additional
/// sections) to [`capped_ttl`]`(ttl, max_ttl)`, except the OPT pseudo-record, whose TTL field
/// holds the extended rcode, the EDNS version and the flags (RFC 6891 6.1.3). Every record
/// type is capped, not only A, AAAA and CNAME: SVCB/HTTPS records carry address hints too, and a
/// shorter TTL on any record only makes a client ask again sooner.
///
/// Returns how many TTLs changed. The framing is checked first (header counts, names, the fixed
/// fields, RDLENGTH within the packet, no trailing bytes; RDATA is not decoded): on error the
/// packet is left untouched.
pub fn cap_ttls(packet: &mut [u8], max_ttl: u32) -> Result<usize, WireError> {
    let mut at = Vec::new();
    ttl_offsets(packet, &mut at)?;
    let mut changed = 0;
    for p in at {
        // Offsets come from the walk above: each has four bytes in the packet.
        if let Some(field) = packet.get_mut(p..p + 4) {
            let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
            let capped = capped_ttl(ttl, max_ttl);
            if capped != ttl {
                field.copy_from_slice(&capped.to_be_bytes());
                changed += 1;
            }
        }
    }
    Ok(changed)
}

/// Appends the offset of the TTL field of every record but OPT.
fn ttl_offsets(buf: &[u8], out: &mut Vec<usize>) -> Result<(), WireError> {
    let header = Header::parse(buf)?;
    let len = buf.len();
    let truncated = |what, at| WireError::new(WireErrorKind::Truncated { what }, at);
    let mut p = HEADER_LEN;
    let sections = [
        (Section::Question, header.qdcount),
        (Section::Answer, header.ancount),
        (Section::Authority, header.nscount),
        (Section::Additional, header.arcount),
    ];
    for (section, count) in sections {
        for i in 0..count {
            if p >= len {
                return Err(WireError::new(
                    WireErrorKind::CountTooLarge {
                        section,
                        claimed: count,
                        found: i,
                    },
                    p,
                ));
            }
            let q = read_name(buf, p, len, true)?.end;
            if section == Section::Question {
                if q + 4 > len {
                    return Err(truncated("question type and class", q));
                }
                p = q + 4;
                continue;
            }
            // TYPE, CLASS, TTL, RDLENGTH: 10 bytes (RFC 1035 4.1.3).
            let Some(fixed) = buf.get(q..q + 10) else {
                return Err(truncated("record header", q));
            };
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let rdlength = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            let end = q + 10 + rdlength;
            if end > len {
                return Err(truncated("RDATA", q + 10));
            }
            if rtype != types::OPT {
                out.push(q + 4);
            }
            p = end;
        }
    }
    if p != len {
        return Err(WireError::new(
            WireErrorKind::TrailingBytes { count: len - p },
            p,
        ));
    }
    Ok(())
}
