//! Every entry point on arbitrary bytes: no panic, and the entry points agree with each other.
#![no_main]

use _core::pattern::LabelBuf;
use _core::wire::{cap_ttls, capped_ttl, error_response, resolve, set_id, Message, QueryView};
use libfuzzer_sys::fuzz_target;

/// (type, class, TTL) of every record, section after section.
fn records(m: &Message<'_>) -> Vec<(u16, u16, u32)> {
    [&m.answers, &m.authority, &m.additional]
        .into_iter()
        .flatten()
        .map(|r| (r.rtype, r.rclass, r.ttl))
        .collect()
}

fn edns(m: &Message<'_>) -> Option<(u16, u8, u8, u16)> {
    m.edns
        .map(|e| (e.udp_size, e.ext_rcode, e.version, e.flags))
}

fuzz_target!(|data: &[u8]| {
    let full = Message::parse(data);
    let query = QueryView::parse(data);
    let resolution = resolve(data);
    let mut out = Vec::new();
    let rcode = data.first().map_or(0, |b| u16::from(*b) * 17);
    let response = error_response(data, rcode, &mut out);
    match &full {
        Err(e) => {
            // A malformed message is malformed for every entry point (which may object to
            // something else first, such as QR set for a query).
            let _ = e;
            assert!(query.is_err());
            assert!(resolution.is_err() && response.is_err());
        }
        Ok(m) => {
            if let Ok(q) = &query {
                assert_eq!(m.questions.len(), 1);
                assert!(q.qname.eq_ignore_case(&m.questions[0].name));
                // The hot-path labels equal the presentation text read back and lower-cased.
                let text = q.qname.to_text();
                let back = LabelBuf::from_presentation(text.as_bytes()).expect("own text parses");
                let labels = q.labels();
                assert_eq!(format!("{back:?}"), format!("{labels:?}"));
            }
            if let Ok(r) = &resolution {
                assert!(!r.chain.is_empty() && r.chain.len() <= 17);
            }
            if response.is_ok() {
                let back = Message::parse(&out).expect("our response parses");
                assert_eq!(back.header.id, m.header.id);
                assert_eq!(back.rcode(), rcode);
            }
        }
    }
    let mut copy = data.to_vec();
    if set_id(&mut copy, 0xabcd).is_ok() {
        assert_eq!(&copy[2..], &data[2..]);
    }
    // The TTL cap: refused with the packet untouched, or every TTL capped and nothing else
    // changed (the OPT record's extended rcode, version and flags included).
    let max_ttl = data
        .get(2..6)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut capped = data.to_vec();
    match cap_ttls(&mut capped, max_ttl) {
        Err(_) => {
            assert_eq!(capped, data);
            assert!(
                full.is_err(),
                "the cap refuses only what the parser refuses"
            );
        }
        Ok(_) => {
            if let Ok(m) = &full {
                let after = Message::parse(&capped).expect("a capped message parses");
                let want: Vec<_> = records(m)
                    .into_iter()
                    .map(|(t, c, ttl)| (t, c, capped_ttl(ttl, max_ttl)))
                    .collect();
                assert_eq!(records(&after), want);
                assert_eq!(edns(m), edns(&after));
                assert_eq!(m.rcode(), after.rcode());
            }
        }
    }
});
