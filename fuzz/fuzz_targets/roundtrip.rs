//! Round trip: a message we accept, re-encoded without compression, parses to the same fields;
//! the error response to an accepted query parses and carries its id, question and rcode.
#![no_main]

use _core::wire::{error_response, types, Message, Name, RData, Record};
use libfuzzer_sys::fuzz_target;

fn put_name(out: &mut Vec<u8>, n: &Name<'_>) {
    n.write_wire(out);
}

fn put_record(out: &mut Vec<u8>, r: &Record<'_>) {
    put_name(out, &r.name);
    out.extend_from_slice(&r.rtype.to_be_bytes());
    out.extend_from_slice(&r.rclass.to_be_bytes());
    out.extend_from_slice(&r.ttl.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    match r.rdata {
        RData::A(a) => out.extend_from_slice(&a.octets()),
        RData::Aaaa(a) => out.extend_from_slice(&a.octets()),
        RData::Cname(n) | RData::Dname(n) | RData::Ns(n) | RData::Ptr(n) => put_name(out, &n),
        RData::Mx {
            preference,
            exchange,
        } => {
            out.extend_from_slice(&preference.to_be_bytes());
            put_name(out, &exchange);
        }
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => {
            for v in [priority, weight, port] {
                out.extend_from_slice(&v.to_be_bytes());
            }
            put_name(out, &target);
        }
        RData::Soa {
            mname,
            rname,
            serial,
            refresh,
            retry,
            expire,
            minimum,
        } => {
            put_name(out, &mname);
            put_name(out, &rname);
            for v in [serial, refresh, retry, expire, minimum] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        RData::Txt(strings) => {
            for s in strings {
                out.push(s.len() as u8);
                out.extend_from_slice(s);
            }
        }
        RData::Other(raw) => out.extend_from_slice(raw),
    }
    let len = (out.len() - len_at - 2) as u16;
    out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
}

fn encode(m: &Message<'_>) -> Vec<u8> {
    let h = m.header;
    let mut out = Vec::new();
    for w in [h.id, h.flags, h.qdcount, h.ancount, h.nscount, h.arcount] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    for q in &m.questions {
        put_name(&mut out, &q.name);
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&q.qclass.to_be_bytes());
    }
    for r in m.answers.iter().chain(&m.authority).chain(&m.additional) {
        put_record(&mut out, r);
    }
    if let Some(e) = m.edns {
        out.push(0);
        out.extend_from_slice(&types::OPT.to_be_bytes());
        out.extend_from_slice(&e.udp_size.to_be_bytes());
        let ttl = u32::from(e.ext_rcode) << 24 | u32::from(e.version) << 16 | u32::from(e.flags);
        out.extend_from_slice(&ttl.to_be_bytes());
        let opts: Vec<u8> = e
            .options
            .flat_map(|(c, d)| {
                let mut v = c.to_be_bytes().to_vec();
                v.extend_from_slice(&(d.len() as u16).to_be_bytes());
                v.extend_from_slice(d);
                v
            })
            .collect();
        out.extend_from_slice(&(opts.len() as u16).to_be_bytes());
        out.extend_from_slice(&opts);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::parse(data) else { return };
    // OPT goes last in our encoding; elsewhere in the additional section the order differs,
    // which the field-by-field comparison below does not care about.
    let again = encode(&m);
    let back = Message::parse(&again).expect("re-encoded message parses");
    assert_eq!(format!("{:?}", back.header), format!("{:?}", m.header));
    assert_eq!(
        format!("{:?}", back.questions),
        format!("{:?}", m.questions)
    );
    assert_eq!(format!("{:?}", back.answers), format!("{:?}", m.answers));
    assert_eq!(
        format!("{:?}", back.authority),
        format!("{:?}", m.authority)
    );
    assert_eq!(
        format!("{:?}", back.additional),
        format!("{:?}", m.additional)
    );
    assert_eq!(format!("{:?}", back.edns), format!("{:?}", m.edns));

    if !m.header.qr() && m.questions.len() <= 1 {
        let rcode = u16::from(data[0] & 0x0f)
            | if m.edns.is_some() {
                u16::from(data[1]) << 4
            } else {
                0
            };
        let mut out = Vec::new();
        error_response(data, rcode, &mut out).expect("a query we accept gets a response");
        let r = Message::parse(&out).expect("our response parses");
        assert!(r.header.qr() && r.header.id == m.header.id && r.rcode() == rcode);
        assert_eq!(r.header.rd(), m.header.rd());
        assert_eq!(r.questions.len(), m.questions.len());
        for (a, b) in r.questions.iter().zip(&m.questions) {
            assert_eq!(a.name.to_text(), b.name.to_text());
            assert_eq!((a.qtype, a.qclass), (b.qtype, b.qclass));
        }
        assert_eq!(r.edns.is_some(), m.edns.is_some());
    }
});
