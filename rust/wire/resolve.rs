//! The resolution an answer gives for its question: the CNAME chain from the question name and
//! the addresses owned by names on it, each with the smallest TTL along the way.

use std::net::IpAddr;

use super::error::{Section, WireError, WireErrorKind};
use super::message::{walk, Header, RData, Record};
use super::name::Name;
use super::types;

/// Most CNAME records followed from the question name; a longer chain stops there.
pub const MAX_CHAIN: usize = 16;

/// What an answer resolves its question to.
#[derive(Debug, Clone)]
pub struct Resolution<'a> {
    pub header: Header,
    /// The question name as the packet spells it.
    pub qname: Name<'a>,
    pub qtype: u16,
    pub qclass: u16,
    /// The question name, then each CNAME target followed (at most `1 + MAX_CHAIN` names).
    pub chain: Vec<Name<'a>>,
    /// Addresses owned by a name on the chain, in packet order, each with
    /// `min(TTL of the address record, TTLs of the CNAMEs leading to its owner)`.
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Validates a whole answer and resolves its one question, over the raw bytes: no
/// [`super::Message`] is built. Only class IN records count. The chain is followed from the
/// question name (case-insensitive): the first CNAME owned by the last name on the chain extends
/// it; it stops at [`MAX_CHAIN`] CNAMEs or when a target is already on the chain (a loop).
/// Records owned by names off the chain are ignored: an upstream cannot plant an address for
/// another name.
pub fn resolve(buf: &[u8]) -> Result<Resolution<'_>, WireError> {
    let mut question = None;
    // The class IN CNAME and address records of the answer section: one pass, then the chain
    // is followed in memory.
    let ancount = Header::parse(buf)?.ancount;
    let mut relevant: Vec<Record<'_>> = Vec::with_capacity(usize::from(ancount.min(32)));
    let walked = walk(
        buf,
        |q| {
            if question.is_none() {
                question = Some(q);
            }
        },
        |section, r| {
            if section == Section::Answer
                && r.rclass == types::CLASS_IN
                && matches!(r.rdata, RData::Cname(_) | RData::A(_) | RData::Aaaa(_))
            {
                relevant.push(r);
            }
        },
    )?;
    let header = walked.header;
    let q = match question {
        Some(q) if header.qdcount == 1 => q,
        _ => {
            return Err(WireError::new(
                WireErrorKind::QuestionCount {
                    count: header.qdcount,
                },
                4,
            ))
        }
    };
    let mut chain = Vec::with_capacity(4);
    chain.push(q.name);
    // ttls[k]: the smallest CNAME TTL on the way from the question name to chain[k].
    let mut ttls = [u32::MAX; MAX_CHAIN + 1];
    while chain.len() <= MAX_CHAIN {
        let Some(last) = chain.last().copied() else {
            break;
        };
        let next = relevant.iter().find_map(|r| match r.rdata {
            RData::Cname(target) if r.name.eq_ignore_case(&last) => Some((target, r.ttl)),
            _ => None,
        });
        let Some((target, ttl)) = next else { break };
        if chain.iter().any(|n| n.eq_ignore_case(&target)) {
            break; // a loop
        }
        let before = ttls.get(chain.len() - 1).copied().unwrap_or(u32::MAX);
        if let Some(slot) = ttls.get_mut(chain.len()) {
            *slot = before.min(ttl);
        }
        chain.push(target);
    }
    let mut addresses = Vec::with_capacity(relevant.len());
    for r in &relevant {
        let ip = match r.rdata {
            RData::A(a) => IpAddr::V4(a),
            RData::Aaaa(a) => IpAddr::V6(a),
            _ => continue,
        };
        if let Some(k) = chain.iter().position(|n| n.eq_ignore_case(&r.name)) {
            let limit = ttls.get(k).copied().unwrap_or(u32::MAX);
            addresses.push((ip, r.ttl.min(limit)));
        }
    }
    Ok(Resolution {
        header,
        qname: q.name,
        qtype: q.qtype,
        qclass: q.qclass,
        chain,
        addresses,
    })
}
