//! Table-driven tests with byte vectors: one case per rule, and one per malformed input.

use super::*;
use WireErrorKind::*;

/// A name in wire form from dotted text (no escapes; "" is the root).
fn n(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in text.split('.').filter(|l| !l.is_empty()) {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// A header followed by the body parts.
fn msg(id: u16, flags: u16, counts: [u16; 4], body: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in [id, flags, counts[0], counts[1], counts[2], counts[3]] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    for b in body {
        out.extend_from_slice(b);
    }
    out
}

fn q(name: &[u8], qtype: u16) -> Vec<u8> {
    let mut out = name.to_vec();
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out
}

fn rr(name: &[u8], rtype: u16, class: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut out = name.to_vec();
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

fn opt(udp: u16, ttl: u32, options: &[u8]) -> Vec<u8> {
    rr(&[0], types::OPT, udp, ttl, options)
}

fn kind(buf: &[u8]) -> WireErrorKind {
    Message::parse(buf).expect_err("must be rejected").kind
}

/// A query for www.example.com A: header + question (offset 12, name ends at 29).
fn query(flags: u16) -> Vec<u8> {
    msg(0x1234, flags, [1, 0, 0, 0], &[&q(&n("www.example.com"), 1)])
}

#[test]
fn header_flags() {
    let cases: &[(u16, [bool; 7], u8, u8)] = &[
        (0x0000, [false; 7], 0, 0),
        (
            0x8000,
            [true, false, false, false, false, false, false],
            0,
            0,
        ),
        (
            0x0400,
            [false, true, false, false, false, false, false],
            0,
            0,
        ),
        (
            0x0200,
            [false, false, true, false, false, false, false],
            0,
            0,
        ),
        (
            0x0100,
            [false, false, false, true, false, false, false],
            0,
            0,
        ),
        (
            0x0080,
            [false, false, false, false, true, false, false],
            0,
            0,
        ),
        (
            0x0020,
            [false, false, false, false, false, true, false],
            0,
            0,
        ),
        (
            0x0010,
            [false, false, false, false, false, false, true],
            0,
            0,
        ),
        (0x2805, [false; 7], 5, 5),
    ];
    for &(flags, bits, opcode, rcode) in cases {
        let buf = msg(7, flags, [0; 4], &[]);
        let m = Message::parse(&buf).expect("valid");
        let h = m.header;
        assert_eq!(
            [h.qr(), h.aa(), h.tc(), h.rd(), h.ra(), h.ad(), h.cd()],
            bits,
            "{flags:#06x}"
        );
        assert_eq!((h.id, h.opcode(), m.rcode()), (7, opcode, u16::from(rcode)));
    }
}

#[test]
fn names() {
    let mut odd = vec![
        3, b'a', b'.', b'b', 4, b'"', b'(', 0, 0xff, 3, b'@', b'$', b';',
    ];
    odd.extend_from_slice(&[1, b'\\', 1, b' ', 0]);
    let cases: &[(Vec<u8>, &str, usize)] = &[
        (n("www.Example.COM"), "www.Example.COM.", 3),
        (n(""), ".", 0),
        // A dot inside a label is data: two labels under example.com, not three.
        (
            [&[3, b'a', b'.', b'b'][..], &n("example.com")].concat(),
            "a\\.b.example.com.",
            3,
        ),
        (odd, "a\\.b.\\\"\\(\\000\\255.\\@\\$\\;.\\\\.\\032.", 5),
        (n(&"a".repeat(63)), &(format!("{}.", "a".repeat(63))), 1),
    ];
    for (wire, text, labels) in cases {
        let buf = msg(0, 0, [1, 0, 0, 0], &[&q(wire, 1)]);
        let m = Message::parse(&buf).expect(text);
        let name = m.questions[0].name;
        assert_eq!(name.to_text(), *text);
        assert_eq!(name.label_count(), *labels, "{text}");
        assert_eq!(name.wire_len(), wire.len(), "{text}");
    }
}

#[test]
fn name_limits() {
    // 255 bytes in wire form: 3 x 63-byte labels + one 61-byte label + root.
    let max = n(&[&"a".repeat(63)[..]; 3].join("."))
        .split_last()
        .map(|(_, l)| l.to_vec());
    let mut max = max.expect("nonempty");
    max.push(61);
    max.extend_from_slice("b".repeat(61).as_bytes());
    max.push(0);
    assert_eq!(max.len(), 255);
    let ok = msg(0, 0, [1, 0, 0, 0], &[&q(&max, 1)]);
    assert_eq!(
        Message::parse(&ok).expect("255").questions[0]
            .name
            .wire_len(),
        255
    );
    let mut long = max[..max.len() - 1].to_vec();
    long.extend_from_slice(&[0]);
    long.insert(0, b'x');
    long.insert(0, 1);
    assert_eq!(kind(&msg(0, 0, [1, 0, 0, 0], &[&q(&long, 1)])), NameTooLong);
}

#[test]
fn compression() {
    // Question www.example.com at 12; "example.com" starts at 16.
    let good = msg(
        0,
        0x8000,
        [1, 1, 0, 0],
        &[
            &q(&n("www.example.com"), 1),
            &rr(&[3, b'f', b't', b'p', 0xc0, 16], 1, 1, 60, &[1, 2, 3, 4]),
        ],
    );
    let m = Message::parse(&good).expect("valid");
    assert_eq!(m.answers[0].name.to_text(), "ftp.example.com.");
    assert_eq!(m.answers[0].name.wire_len(), 17);
    // Pointer into the header is "before the name" and legal when the bytes there parse.
    let hdr_ptr = msg(0, 0, [1, 0, 0, 0], &[&[0xc0, 0x05, 0, 1, 0, 1]]);
    assert_eq!(
        Message::parse(&hdr_ptr).expect("valid").questions[0]
            .name
            .to_text(),
        "\\000."
    );
    // A ladder of pointers inside an unknown record's RDATA, then an owner name pointing at its
    // top: each pointer goes strictly back to the previous one.
    let ladder_rr = |hops: u16| {
        // rr at 12: owner root (1) + 10 fixed = rdata at 23. Ladder inside rdata starts at 23.
        let mut rd = vec![0u8];
        for i in 0..hops {
            let target = if i == 0 { 23 } else { 24 + 2 * (i - 1) };
            rd.extend_from_slice(&(0xc000 | target).to_be_bytes());
        }
        let top = 24 + 2 * (hops - 1);
        let mut b = rr(&[0], 65280, 1, 0, &rd);
        b.extend_from_slice(&rr(&(0xc000 | top).to_be_bytes(), 1, 1, 0, &[1, 1, 1, 1]));
        msg(0, 0x8000, [0, 2, 0, 0], &[&b])
    };
    // The second record's owner is one more pointer: 15 in the ladder + 1 = 16 hops.
    assert!(Message::parse(&ladder_rr(15)).is_ok());
    assert_eq!(kind(&ladder_rr(16)), TooManyPointers);

    let bad: &[(&str, Vec<u8>, WireErrorKind)] = &[
        (
            "forward pointer",
            msg(0, 0, [1, 0, 0, 0], &[&[0xc0, 14, 0, 1, 0, 1, 0]]),
            BadPointer { target: 14 },
        ),
        (
            "pointer to itself",
            msg(0, 0, [1, 0, 0, 0], &[&[0xc0, 12, 0, 1, 0, 1]]),
            BadPointer { target: 12 },
        ),
        (
            "pointer into its own name",
            msg(0, 0, [1, 0, 0, 0], &[&[1, b'a', 0xc0, 12, 0, 1, 0, 1]]),
            BadPointer { target: 12 },
        ),
        (
            // A loop needs a forward pointer somewhere: 12 -> 14 -> 12.
            "pointer loop",
            msg(0, 0, [1, 0, 0, 0], &[&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]]),
            BadPointer { target: 14 },
        ),
        (
            // Question 2 (at 19) points to 18, where a one-byte label would run into 19: the
            // piece pointed to must end before the piece that points to it.
            "target overlapping the pointing piece",
            msg(
                0,
                0,
                [2, 0, 0, 0],
                &[&[1, b'x', 0, 0, 1, 0, 1], &[1, b'c', 0xc0, 18, 0, 1, 0, 1]],
            ),
            Truncated { what: "label" },
        ),
        (
            "label type 01",
            msg(0, 0, [1, 0, 0, 0], &[&[0x41, 0, 0, 1, 0, 1]]),
            BadLabelType { byte: 0x41 },
        ),
        (
            "label type 10",
            msg(0, 0, [1, 0, 0, 0], &[&[0x80, 0, 0, 1, 0, 1]]),
            BadLabelType { byte: 0x80 },
        ),
        (
            "64-byte label",
            msg(0, 0, [1, 0, 0, 0], &[&q(&n(&"a".repeat(64)), 1)]),
            BadLabelType { byte: 64 },
        ),
        (
            "label past the end",
            msg(0, 0, [1, 0, 0, 0], &[&[5, b'a', b'b']]),
            Truncated { what: "label" },
        ),
        (
            "no root byte",
            msg(0, 0, [1, 0, 0, 0], &[&[1, b'a']]),
            Truncated { what: "name" },
        ),
        (
            "half a pointer",
            msg(0, 0, [1, 0, 0, 0], &[&[1, b'a', 0xc0]]),
            Truncated {
                what: "compression pointer",
            },
        ),
    ];
    for (what, buf, want) in bad {
        assert_eq!(&kind(buf), want, "{what}");
    }
}

#[test]
fn framing_errors() {
    let a = rr(&n("a"), 1, 1, 1, &[1, 2, 3, 4]);
    let cases: &[(&str, Vec<u8>, WireErrorKind)] = &[
        ("empty", vec![], ShortHeader { len: 0 }),
        ("11 bytes", vec![0; 11], ShortHeader { len: 11 }),
        (
            "question count over-claims",
            msg(0, 0, [2, 0, 0, 0], &[&q(&n("a"), 1)]),
            CountTooLarge {
                section: Section::Question,
                claimed: 2,
                found: 1,
            },
        ),
        (
            "answer count over-claims",
            msg(0, 0, [0, 3, 0, 0], &[&a, &a]),
            CountTooLarge {
                section: Section::Answer,
                claimed: 3,
                found: 2,
            },
        ),
        (
            "authority count over-claims",
            msg(0, 0, [0, 0, 1, 0], &[]),
            CountTooLarge {
                section: Section::Authority,
                claimed: 1,
                found: 0,
            },
        ),
        (
            "additional count over-claims",
            msg(0, 0, [0, 0, 0, 65535], &[&a]),
            CountTooLarge {
                section: Section::Additional,
                claimed: 65535,
                found: 1,
            },
        ),
        (
            "trailing byte",
            msg(0, 0, [0, 1, 0, 0], &[&a, &[0]]),
            TrailingBytes { count: 1 },
        ),
        (
            "trailing bytes, no records",
            msg(0, 0, [0; 4], &[&[1, 2, 3]]),
            TrailingBytes { count: 3 },
        ),
        (
            "question cut in its type",
            msg(0, 0, [1, 0, 0, 0], &[&n("a"), &[0]]),
            Truncated {
                what: "question type",
            },
        ),
        (
            "question without class",
            msg(0, 0, [1, 0, 0, 0], &[&n("a"), &[0, 1]]),
            Truncated {
                what: "question class",
            },
        ),
        (
            "record cut in its TTL",
            msg(0, 0, [0, 1, 0, 0], &[&a[..7]]),
            Truncated { what: "record TTL" },
        ),
        (
            "record without RDLENGTH",
            msg(0, 0, [0, 1, 0, 0], &[&a[..11]]),
            Truncated {
                what: "record RDLENGTH",
            },
        ),
        (
            "RDLENGTH past the end",
            msg(0, 0, [0, 1, 0, 0], &[&a[..a.len() - 1]]),
            Truncated { what: "RDATA" },
        ),
    ];
    for (what, buf, want) in cases {
        assert_eq!(&kind(buf), want, "{what}");
    }
}

fn answer(rtype: u16, class: u16, rdata: &[u8]) -> Vec<u8> {
    // Question example.com at 12 (name bytes 12..25) so RDATA can point at 12.
    msg(
        0,
        0x8000,
        [1, 1, 0, 0],
        &[
            &q(&n("example.com"), rtype),
            &rr(&[0xc0, 12], rtype, class, 300, rdata),
        ],
    )
}

fn one_rdata(buf: &[u8]) -> String {
    let m = Message::parse(buf).expect("valid");
    let r = &m.answers[0];
    match r.rdata {
        RData::A(a) => format!("A {a}"),
        RData::Aaaa(a) => format!("AAAA {a}"),
        RData::Cname(x) => format!("CNAME {x}"),
        RData::Dname(x) => format!("DNAME {x}"),
        RData::Ns(x) => format!("NS {x}"),
        RData::Ptr(x) => format!("PTR {x}"),
        RData::Mx {
            preference,
            exchange,
        } => format!("MX {preference} {exchange}"),
        RData::Soa {
            mname,
            rname,
            serial,
            refresh,
            retry,
            expire,
            minimum,
        } => format!("SOA {mname} {rname} {serial} {refresh} {retry} {expire} {minimum}"),
        RData::Txt(s) => format!(
            "TXT {:?}",
            s.map(|x| String::from_utf8_lossy(x).into_owned())
                .collect::<Vec<_>>()
        ),
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => format!("SRV {priority} {weight} {port} {target}"),
        RData::Other(b) => format!("{} {b:?}", r.rtype),
    }
}

#[test]
fn rdata() {
    let ptr: &[u8] = &[0xc0, 12];
    let soa = [
        &n("ns1.example.com")[..],
        ptr,
        &[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5],
    ]
    .concat();
    let mut aaaa = [0u8; 16];
    aaaa[0] = 0x20;
    aaaa[1] = 0x01;
    aaaa[15] = 1;
    let cases: &[(u16, u16, Vec<u8>, &str)] = &[
        (1, 1, vec![192, 0, 2, 1], "A 192.0.2.1"),
        (28, 1, aaaa.to_vec(), "AAAA 2001::1"),
        (5, 1, n("Target.example.net"), "CNAME Target.example.net."),
        (5, 1, ptr.to_vec(), "CNAME example.com."),
        (39, 1, n("example.net"), "DNAME example.net."),
        (
            2,
            1,
            [&[3, b'n', b's', b'1'][..], ptr].concat(),
            "NS ns1.example.com.",
        ),
        (12, 1, n("host.example"), "PTR host.example."),
        (15, 1, [&[0, 10][..], ptr].concat(), "MX 10 example.com."),
        (6, 1, soa, "SOA ns1.example.com. example.com. 1 2 3 4 5"),
        (
            16,
            1,
            b"\x03abc\x00\x01x".to_vec(),
            "TXT [\"abc\", \"\", \"x\"]",
        ),
        (
            33,
            1,
            [&[0, 1, 0, 2, 0x01, 0xbb][..], &n("srv.example")].concat(),
            "SRV 1 2 443 srv.example.",
        ),
        // Unknown types, and class-specific types in another class, stay raw.
        (65280, 1, vec![1, 2, 3], "65280 [1, 2, 3]"),
        (1, 3, vec![1, 2, 3], "1 [1, 2, 3]"),
        (33, 3, vec![9], "33 [9]"),
        (99, 1, vec![], "99 []"),
    ];
    for (rtype, class, rd, want) in cases {
        assert_eq!(one_rdata(&answer(*rtype, *class, rd)), *want);
    }
}

#[test]
fn rdata_errors() {
    let rdlen = |rtype, rdlength, consumed| RdataLength {
        rtype,
        rdlength,
        consumed,
    };
    let cases: &[(&str, u16, Vec<u8>, WireErrorKind)] = &[
        ("A of 3", 1, vec![1, 2, 3], rdlen(1, 3, 4)),
        ("A of 5", 1, vec![1, 2, 3, 4, 5], rdlen(1, 5, 4)),
        ("AAAA of 15", 28, vec![0; 15], rdlen(28, 15, 16)),
        (
            "CNAME with a byte after the name",
            5,
            [&n("a")[..], &[0]].concat(),
            rdlen(5, 4, 3),
        ),
        (
            "CNAME name running past RDLENGTH",
            5,
            vec![3, b'a', b'b'],
            Truncated { what: "label" },
        ),
        (
            "DNAME target compressed",
            39,
            vec![0xc0, 12],
            CompressionForbidden,
        ),
        (
            "MX without a name",
            15,
            vec![0, 1],
            Truncated { what: "name" },
        ),
        (
            "MX cut in its preference",
            15,
            vec![0],
            Truncated {
                what: "MX preference",
            },
        ),
        (
            "SOA one byte long",
            6,
            [&n("a")[..], &n("b"), &[0; 21]].concat(),
            rdlen(6, 27, 26),
        ),
        (
            "SOA short",
            6,
            [&n("a")[..], &n("b"), &[0; 19]].concat(),
            Truncated { what: "SOA field" },
        ),
        ("TXT empty", 16, vec![], EmptyTxt),
        (
            "TXT string past RDLENGTH",
            16,
            vec![3, b'a', b'b'],
            Truncated {
                what: "TXT character-string",
            },
        ),
        (
            "SRV short",
            33,
            vec![0, 1, 0, 2, 0],
            Truncated { what: "SRV port" },
        ),
    ];
    for (what, rtype, rd, want) in cases {
        assert_eq!(&kind(&answer(*rtype, 1, rd)), want, "{what}");
    }
}

#[test]
fn ttl_top_bit_is_zero() {
    let m = msg(
        0,
        0,
        [0, 2, 0, 0],
        &[
            &rr(&n("a"), 1, 1, 0x8000_0000, &[1, 1, 1, 1]),
            &rr(&n("a"), 1, 1, 0x7fff_ffff, &[1, 1, 1, 1]),
        ],
    );
    let m = Message::parse(&m).expect("valid");
    assert_eq!((m.answers[0].ttl, m.answers[1].ttl), (0, 0x7fff_ffff));
}

#[test]
fn edns() {
    let options = [&[0, 10, 0, 2, 0xab, 0xcd][..], &[0, 3, 0, 0]].concat();
    let buf = msg(
        1,
        0x8003,
        [0, 0, 0, 2],
        &[
            &opt(4096, 0x0100_8000, &options),
            &rr(&n("a"), 1, 1, 5, &[1, 2, 3, 4]),
        ],
    );
    let m = Message::parse(&buf).expect("valid");
    let e = m.edns.expect("OPT");
    assert_eq!(
        (e.udp_size, e.ext_rcode, e.version, e.dnssec_ok()),
        (4096, 1, 0, true)
    );
    assert_eq!(
        e.options.collect::<Vec<_>>(),
        vec![(10, &[0xab, 0xcd][..]), (3, &[][..])]
    );
    assert_eq!(m.rcode(), 0x13); // 1 << 4 | 3
    assert_eq!(m.additional.len(), 1, "OPT is reported through edns only");
    let buf = msg(0, 0, [0, 0, 0, 1], &[&opt(512, 0x0001_0000, &[])]);
    let ver = Message::parse(&buf).expect("valid");
    assert_eq!(ver.edns.expect("OPT").version, 1);

    let bad: &[(&str, Vec<u8>, WireErrorKind)] = &[
        (
            "OPT in the answer section",
            msg(0, 0, [0, 1, 0, 0], &[&opt(512, 0, &[])]),
            BadOpt {
                why: "OPT outside the additional section",
            },
        ),
        (
            "two OPT records",
            msg(0, 0, [0, 0, 0, 2], &[&opt(512, 0, &[]), &opt(512, 0, &[])]),
            BadOpt {
                why: "more than one OPT record",
            },
        ),
        (
            "OPT owner not root",
            msg(0, 0, [0, 0, 0, 1], &[&rr(&n("a"), 41, 512, 0, &[])]),
            BadOpt {
                why: "OPT owner name is not the root",
            },
        ),
        (
            "option header cut",
            msg(0, 0, [0, 0, 0, 1], &[&opt(512, 0, &[0, 10, 0])]),
            Truncated {
                what: "EDNS option",
            },
        ),
        (
            "option longer than the RDATA",
            msg(0, 0, [0, 0, 0, 1], &[&opt(512, 0, &[0, 10, 0, 3, 1, 2])]),
            Truncated {
                what: "EDNS option",
            },
        ),
    ];
    for (what, buf, want) in bad {
        assert_eq!(&kind(buf), want, "{what}");
    }
}

#[test]
fn query_view() {
    let buf = query(0x0100);
    let v = QueryView::parse(&buf).expect("valid");
    assert_eq!((v.header.id, v.qtype, v.qclass), (0x1234, 1, 1));
    assert_eq!(v.question_end, buf.len());
    assert!(v.edns.is_none());
    let labels = v.labels();
    assert_eq!(
        (0..labels.len())
            .map(|i| labels.label(i))
            .collect::<Vec<_>>(),
        vec![&b"www"[..], b"example", b"com"]
    );
    // Lower-cased for matching, dots inside labels kept inside them.
    let odd = msg(
        0,
        0,
        [1, 0, 0, 1],
        &[
            &q(&[3, b'A', b'.', b'B', 2, b'C', b'o', 0], 28),
            &opt(1232, 0, &[]),
        ],
    );
    let v = QueryView::parse(&odd).expect("valid");
    let labels = v.labels();
    assert_eq!(
        (labels.len(), labels.label(0), labels.label(1)),
        (2, &b"a.b"[..], &b"co"[..])
    );
    assert_eq!((v.qtype, v.question_end), (28, 12 + 8 + 4));
    assert_eq!(v.edns.expect("OPT").udp_size, 1232);

    let bad: &[(&str, Vec<u8>, WireErrorKind)] = &[
        ("response", query(0x8000), NotAQuery),
        ("opcode NOTIFY", query(4 << 11), BadOpcode { opcode: 4 }),
        (
            "no question",
            msg(0, 0, [0; 4], &[]),
            QuestionCount { count: 0 },
        ),
        (
            "two questions",
            msg(0, 0, [2, 0, 0, 0], &[&q(&n("a"), 1), &q(&n("b"), 1)]),
            QuestionCount { count: 2 },
        ),
        (
            "trailing byte",
            [&query(0)[..], &[0]].concat(),
            TrailingBytes { count: 1 },
        ),
        ("short", vec![0; 5], ShortHeader { len: 5 }),
    ];
    for (what, buf, want) in bad {
        assert_eq!(&QueryView::parse(buf).expect_err(what).kind, want, "{what}");
    }
}

#[test]
fn ids() {
    let mut buf = query(0);
    set_id(&mut buf, 0xbeef).expect("long enough");
    assert_eq!(&buf[..2], &[0xbe, 0xef]);
    assert_eq!(buf[2..], query(0)[2..], "nothing else changes");
    assert_eq!(
        set_id(&mut [0; 11], 1).expect_err("short").kind,
        ShortHeader { len: 11 }
    );
}

#[test]
fn error_responses() {
    // RD + opcode 0, compressed-looking question (pointer into itself is invalid, so plain).
    let with_opt = msg(
        0x4242,
        0x0130, // RD, AD, CD set in the query: only RD is copied
        [1, 0, 0, 1],
        &[
            &q(&n("Blocked.Example"), 1),
            &opt(4096, 0x0000_8000, &[0, 10, 0, 0]),
        ],
    );
    // (query, rcode, response flags, OPT's (ext rcode, DO))
    type Case<'a> = (&'a [u8], u16, u16, Option<(u8, bool)>);
    let cases: &[Case<'_>] = &[
        (&query(0x0100), types::REFUSED, 0x8105, None),
        (&query(0x0000), types::NXDOMAIN, 0x8003, None),
        (&query(0x0100), types::SERVFAIL, 0x8102, None),
        (&query(0x0100), types::FORMERR, 0x8101, None),
        (&with_opt, types::REFUSED, 0x8105, Some((0, true))),
        (&with_opt, 16, 0x8100, Some((1, true))), // BADVERS: upper bits in the OPT
    ];
    for &(query, rcode, flags, edns) in cases {
        let mut out = Vec::new();
        error_response(query, rcode, &mut out).expect("valid query");
        let qm = Message::parse(query).expect("valid");
        let m = Message::parse(&out).expect("response parses");
        assert_eq!((m.header.id, m.header.flags), (qm.header.id, flags));
        assert_eq!(m.rcode(), rcode);
        assert_eq!(m.questions.len(), 1);
        assert!(m.questions[0].name.eq_ignore_case(&qm.questions[0].name));
        assert_eq!(
            m.questions[0].name.to_text(),
            qm.questions[0].name.to_text()
        );
        assert!(m.answers.is_empty() && m.authority.is_empty() && m.additional.is_empty());
        let got = m.edns.map(|e| (e.ext_rcode, e.dnssec_ok()));
        assert_eq!(got, edns);
        if let Some(e) = m.edns {
            assert_eq!(
                (e.udp_size, e.version, e.options.count()),
                (EDNS_UDP_SIZE, 0, 0)
            );
        }
    }
    // A question name compressed into the header comes out uncompressed.
    let mut out = Vec::new();
    let hdr_ptr = msg(0, 0, [1, 0, 0, 0], &[&[0xc0, 0x05, 0, 1, 0, 1]]);
    error_response(&hdr_ptr, 5, &mut out).expect("valid");
    assert_eq!(&out[12..], &[1, 0, 0, 0, 1, 0, 1]);

    let bad: &[(&str, Vec<u8>, u16, WireErrorKind)] = &[
        ("rcode 4096", query(0), 4096, BadRcode { rcode: 4096 }),
        ("rcode 16 without OPT", query(0), 16, BadRcode { rcode: 16 }),
        ("a response", query(0x8000), 5, NotAQuery),
        (
            "two questions",
            msg(0, 0, [2, 0, 0, 0], &[&q(&n("a"), 1), &q(&n("b"), 1)]),
            5,
            QuestionCount { count: 2 },
        ),
        (
            "malformed",
            query(0)[..20].to_vec(),
            5,
            Truncated { what: "label" },
        ),
    ];
    for (what, buf, rcode, want) in bad {
        let mut out = Vec::new();
        assert_eq!(
            &error_response(buf, *rcode, &mut out).expect_err(what).kind,
            want,
            "{what}"
        );
        assert!(out.is_empty(), "{what}: nothing written on error");
    }
}

/// An answer for `qname` A with the given records (owner, type, ttl, rdata).
fn chain_answer(qname: &str, records: &[(&str, u16, u32, Vec<u8>)]) -> Vec<u8> {
    let mut body = q(&n(qname), 1);
    for (owner, rtype, ttl, rd) in records {
        body.extend_from_slice(&rr(&n(owner), *rtype, 1, *ttl, rd));
    }
    msg(9, 0x8180, [1, records.len() as u16, 0, 0], &[&body])
}

fn resolved(buf: &[u8]) -> (String, Vec<(String, u32)>, Vec<String>) {
    let r = resolve(buf).expect("valid");
    (
        r.qname.to_text(),
        r.addresses
            .iter()
            .map(|(a, t)| (a.to_string(), *t))
            .collect(),
        r.chain.iter().map(|c| c.to_text()).collect(),
    )
}

#[test]
fn resolution() {
    let a = |x: u8| vec![192, 0, 2, x];
    // Out of order, mixed case, with a planted address for a name off the chain.
    let buf = chain_answer(
        "WWW.example.com",
        &[
            ("cdn.example.net", 1, 30, a(1)),
            ("www.EXAMPLE.com", 5, 300, n("Edge.example.org")),
            ("victim.example", 1, 999, a(66)),
            ("edge.example.org", 5, 60, n("cdn.example.net")),
            (
                "cdn.example.net",
                28,
                90,
                [&[0x20, 1][..], &[0; 13], &[2]].concat(),
            ),
            ("www.example.com", 1, 500, a(7)),
        ],
    );
    let (qname, addrs, chain) = resolved(&buf);
    assert_eq!(qname, "WWW.example.com.");
    assert_eq!(
        chain,
        ["WWW.example.com.", "Edge.example.org.", "cdn.example.net."]
    );
    assert_eq!(
        addrs,
        [
            ("192.0.2.1".to_owned(), 30),
            ("2001::2".to_owned(), 60),
            ("192.0.2.7".to_owned(), 500)
        ]
    );

    // A loop stops; what was reached still counts.
    let looping = chain_answer(
        "a.test",
        &[
            ("a.test", 5, 100, n("b.test")),
            ("b.test", 5, 50, n("A.TEST")),
            ("b.test", 1, 70, a(2)),
        ],
    );
    let (_, addrs, chain) = resolved(&looping);
    assert_eq!(chain, ["a.test.", "b.test."]);
    assert_eq!(addrs, [("192.0.2.2".to_owned(), 70)]);

    // 17 CNAMEs: the 16th target is the last name followed; the address owned by the 17th
    // target is not reached.
    let mut recs = Vec::new();
    for i in 0..17 {
        recs.push((
            format!("c{i}.test"),
            5u16,
            10u32,
            n(&format!("c{}.test", i + 1)),
        ));
    }
    recs.push(("c16.test".to_owned(), 1, 10, a(16)));
    recs.push(("c17.test".to_owned(), 1, 10, a(17)));
    let recs: Vec<(&str, u16, u32, Vec<u8>)> = recs
        .iter()
        .map(|(o, t, l, r)| (o.as_str(), *t, *l, r.clone()))
        .collect();
    let (_, addrs, chain) = resolved(&chain_answer("c0.test", &recs));
    assert_eq!(chain.len(), 1 + MAX_CHAIN);
    assert_eq!(chain.last().map(String::as_str), Some("c16.test."));
    assert_eq!(addrs, [("192.0.2.16".to_owned(), 10)]);

    // Class CH records do not count; no answer at all gives an empty resolution.
    let mut ch = q(&n("x.test"), 1);
    ch.extend_from_slice(&rr(&n("x.test"), 5, 3, 10, &n("y.test")));
    ch.extend_from_slice(&rr(&n("x.test"), 1, 1, 10, &a(3)));
    let (_, addrs, chain) = resolved(&msg(0, 0x8180, [1, 2, 0, 0], &[&ch]));
    assert_eq!((addrs.len(), chain.len()), (1, 1));
    let (_, addrs, chain) = resolved(&chain_answer("x.test", &[]));
    assert!(addrs.is_empty() && chain == ["x.test."]);

    let none = msg(0, 0x8180, [0, 0, 0, 0], &[]);
    assert_eq!(
        resolve(&none).expect_err("no question").kind,
        QuestionCount { count: 0 }
    );
    let bad = [&chain_answer("x.test", &[])[..], &[0]].concat();
    assert_eq!(
        resolve(&bad).expect_err("trailing").kind,
        TrailingBytes { count: 1 }
    );
}

#[test]
fn errors_name_the_offset() {
    let e = Message::parse(&msg(0, 0, [0, 1, 0, 0], &[&[0xc0, 40]])).expect_err("forward");
    assert_eq!(e.offset, 12);
    assert_eq!(
        e.to_string(),
        "malformed DNS message: compression pointer to 40 does not point strictly before the name (at byte 12)"
    );
}

/// Per section, the TTL of every record; then the EDNS fields (ext rcode, version, flags).
type Ttls = (Vec<u32>, Vec<u32>, Vec<u32>, Option<(u8, u8, u16)>);

/// The TTL of every record as `Message::parse` reads it, section by section, and the EDNS
/// fields (which live in the OPT record's TTL).
fn ttls_and_edns(buf: &[u8]) -> Ttls {
    let m = Message::parse(buf).expect("valid");
    let t = |rs: &[Record<'_>]| rs.iter().map(|r| r.ttl).collect::<Vec<_>>();
    (
        t(&m.answers),
        t(&m.authority),
        t(&m.additional),
        m.edns.map(|e| (e.ext_rcode, e.version, e.flags)),
    )
}

#[test]
fn ttls_capped() {
    let huge = 0x7fff_ffff;
    let a = |x: u8| rr(&n("www.example.com"), 1, 1, huge, &[192, 0, 2, x]);
    let question = q(&n("alias.example.com"), 1);
    // alias -> www (compressed target pointing at the question), two addresses, NS in the
    // authority, glue in the additional section, OPT with DO, version 0 and extended rcode 1.
    let cname = rr(&[0xc0, 12], 5, 1, huge, &[3, b'w', b'w', b'w', 0xc0, 18]);
    let ns = rr(&n("example.com"), 2, 1, 172_800, &n("ns.example.com"));
    let glue = rr(&n("ns.example.com"), 1, 1, 0x8000_0001, &[192, 0, 2, 53]);
    let edns = opt(1232, 0x0100_8000, &[]);
    let full = msg(
        7,
        0x8180,
        [1, 3, 1, 2],
        &[&question, &cname, &a(1), &a(2), &ns, &glue, &edns],
    );
    // (max_ttl, answer TTLs, authority TTLs, additional TTLs, TTLs changed)
    type Case = (u32, [u32; 3], [u32; 1], [u32; 1], usize);
    let cases: &[Case] = &[
        (86_400, [86_400; 3], [86_400], [0], 5),
        (300, [300; 3], [300], [0], 5),
        (172_800, [172_800; 3], [172_800], [0], 4),
        (huge, [huge; 3], [172_800], [0], 1),
        (0, [0; 3], [0], [0], 5),
    ];
    for &(max, answers, authority, additional, changed) in cases {
        let mut buf = full.clone();
        assert_eq!(cap_ttls(&mut buf, max), Ok(changed), "max_ttl {max}");
        let (an, ns, ar, edns) = ttls_and_edns(&buf);
        assert_eq!(an, answers, "max_ttl {max}: answer");
        assert_eq!(ns, authority, "max_ttl {max}: authority");
        assert_eq!(ar, additional, "max_ttl {max}: additional");
        assert_eq!(edns, Some((1, 0, 0x8000)), "max_ttl {max}: OPT untouched");
        // Only TTL fields changed: the rest of the packet is byte for byte the same.
        let diff: Vec<usize> = (0..buf.len()).filter(|&i| buf[i] != full[i]).collect();
        assert!(diff.len() <= 4 * changed, "max_ttl {max}: {diff:?}");
        assert_eq!(resolve(&buf).map(|r| r.chain.len()), Ok(2));
        // Capping again changes nothing.
        let again = buf.clone();
        assert_eq!(cap_ttls(&mut buf, max), Ok(0));
        assert_eq!(buf, again);
    }
}

#[test]
fn capped_ttl_values() {
    // (ttl, max_ttl, capped): RFC 2181 8 first (top bit set reads as 0), then the cap.
    let cases = [
        (0, 86_400, 0),
        (300, 86_400, 300),
        (86_400, 86_400, 86_400),
        (86_401, 86_400, 86_400),
        (0x7fff_ffff, 86_400, 86_400),
        (0x7fff_ffff, 0x7fff_ffff, 0x7fff_ffff),
        (0x8000_0000, 86_400, 0),
        (u32::MAX, u32::MAX, 0),
    ];
    for (ttl, max, want) in cases {
        assert_eq!(capped_ttl(ttl, max), want, "capped_ttl({ttl}, {max})");
    }
}

#[test]
fn ttl_cap_refuses_bad_framing_and_leaves_the_packet_alone() {
    let a = rr(&n("a"), 1, 1, 999_999, &[1, 2, 3, 4]);
    let question = q(&n("a"), 1);
    let good = msg(1, 0x8180, [1, 1, 0, 0], &[&question, &a]);
    let cases: Vec<(&str, Vec<u8>, WireErrorKind)> = vec![
        ("short header", vec![0; 11], ShortHeader { len: 11 }),
        (
            "answer count too large",
            msg(1, 0x8180, [1, 2, 0, 0], &[&question, &a]),
            CountTooLarge {
                section: Section::Answer,
                claimed: 2,
                found: 1,
            },
        ),
        (
            "question cut short",
            msg(1, 0x8180, [1, 0, 0, 0], &[&question[..question.len() - 1]]),
            Truncated {
                what: "question type and class",
            },
        ),
        (
            "record header cut short",
            msg(1, 0x8180, [1, 1, 0, 0], &[&question, &a[..7]]),
            Truncated {
                what: "record header",
            },
        ),
        (
            "RDATA past the end",
            msg(1, 0x8180, [1, 1, 0, 0], &[&question, &a[..a.len() - 1]]),
            Truncated { what: "RDATA" },
        ),
        (
            "trailing bytes",
            msg(1, 0x8180, [1, 1, 0, 0], &[&question, &a, &[0]]),
            TrailingBytes { count: 1 },
        ),
        (
            "pointer loop in an owner name",
            msg(
                1,
                0x8180,
                [1, 1, 0, 0],
                &[&question, &rr(&[0xc0, 19], 1, 1, 999_999, &[1, 2, 3, 4])],
            ),
            BadPointer { target: 19 },
        ),
    ];
    for (what, bad, want) in cases {
        let mut buf = bad.clone();
        let err = cap_ttls(&mut buf, 60).expect_err(what);
        assert_eq!(err.kind, want, "{what}");
        assert_eq!(buf, bad, "{what}: untouched");
        // Whatever the cap refuses, the parser refuses too.
        assert!(Message::parse(&bad).is_err(), "{what}");
    }
    let mut buf = good.clone();
    assert_eq!(cap_ttls(&mut buf, 60), Ok(1));
}
