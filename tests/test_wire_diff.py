"""Differential tests of the wire parser against dnspython.

1. Messages built with dnspython (names with odd bytes, compression, every decoded type, unknown
   types, EDNS with options): every field fqdnguard parses equals what dnspython parses back.
2. Random and mutated bytes: both accept with equal fields, or fqdnguard raises WireError where
   dnspython raises. Never any other exception.

Disagreements kept on purpose (each is checked by `_dnspython_may_reject_more` below):
- Types we do not decode (anything outside A, AAAA, CNAME, DNAME, NS, PTR, SOA, MX, TXT, SRV, and
  A/AAAA/SRV outside class IN) are kept as raw bytes; dnspython validates the RDATA of the many
  types it knows (DS, HINFO, CH A, ...) and rejects malformed ones. The proxy has no use for them
  and must not drop an answer because an unrelated record is odd by dnspython's rules.
- TSIG: dnspython refuses a signed message without a keyring; we keep TSIG as raw data.
- EDNS option contents (ECS, cookies, EDE, ...): we check only the (code, length) framing;
  dnspython decodes some and rejects bad contents.
- UPDATE messages (opcode 5): dnspython applies RFC 2136's section rules (zone section must be one
  SOA, empty RDATA for class ANY/NONE); we read every opcode with RFC 1035 framing. Skipped.
AAAA text: we print RFC 5952 (what Python's `ipaddress` prints); dnspython writes IPv4-compatible
addresses as `::1.2.3.4`. Compared as `ipaddress` objects.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.DNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset
import pytest
from fqdnguard import WireError, parse_message
from hypothesis import example, given
from hypothesis import strategies as st

IN, CH = 1, 3
DECODED_ANY_CLASS = {2, 5, 6, 12, 15, 16, 39}  # NS CNAME SOA PTR MX TXT DNAME
DECODED_IN_ONLY = {1, 28, 33}  # A AAAA SRV
OPT, TSIG = 41, 250

# Labels: random bytes, plus a pool of shared ones so that dnspython's compression kicks in,
# and the bytes that need escaping in presentation form.
label = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.sampled_from([b"www", b"WWW", b"a.b", b"\x00", b"\\", b'"', b"@$;()", b" ", b"\xff"]),
)
suffix = st.sampled_from([(), (b"example", b"com"), (b"EXAMPLE", b"com"), (b"cdn", b"net")])
names = st.builds(
    lambda ls, sfx: dns.name.Name([*ls, *sfx, b""]), st.lists(label, max_size=4), suffix
)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def rdatas(draw: st.DrawFn) -> dns.rdata.Rdata:  # noqa: PLR0911
    kind = draw(
        st.sampled_from(
            ["A", "AAAA", "CNAME", "DNAME", "NS", "PTR", "MX", "SOA", "TXT", "SRV", "generic"]
        )
    )
    cls = draw(st.sampled_from([IN, IN, CH])) if kind in {"CNAME", "NS", "TXT", "MX"} else IN
    if kind == "A":
        return dns.rdtypes.IN.A.A(
            IN, 1, str(ipaddress.IPv4Address(draw(st.binary(min_size=4, max_size=4))))
        )
    if kind == "AAAA":
        return dns.rdtypes.IN.AAAA.AAAA(
            IN, 28, str(ipaddress.IPv6Address(draw(st.binary(min_size=16, max_size=16))))
        )
    if kind in {"CNAME", "DNAME", "NS", "PTR"}:
        mod = getattr(dns.rdtypes.ANY, kind)
        return getattr(mod, kind)(cls, dns.rdatatype.from_text(kind), draw(names))
    if kind == "MX":
        return dns.rdtypes.ANY.MX.MX(cls, 15, draw(u16), draw(names))
    if kind == "SOA":
        return dns.rdtypes.ANY.SOA.SOA(
            IN, 6, draw(names), draw(names), *[draw(u32) for _ in range(5)]
        )
    if kind == "TXT":
        strings = draw(st.lists(st.binary(max_size=255), min_size=1, max_size=3))
        return dns.rdtypes.ANY.TXT.TXT(cls, 16, strings)
    if kind == "SRV":
        return dns.rdtypes.IN.SRV.SRV(IN, 33, draw(u16), draw(u16), draw(u16), draw(names))
    rtype = draw(st.sampled_from([4000, 12345, 65280, 65400]))
    return dns.rdata.GenericRdata(
        draw(st.sampled_from([IN, CH])), rtype, draw(st.binary(max_size=40))
    )


records = st.tuples(names, u32, rdatas())


@st.composite
def messages(draw: st.DrawFn) -> dns.message.Message:
    m = dns.message.Message(id=draw(u16))
    m.flags = draw(st.integers(0, 0xFFFF)) & ~0x780F  # opcode and rcode set below
    m.set_opcode(draw(st.sampled_from([0, 1, 2, 4])))
    for _ in range(draw(st.integers(0, 2))):
        m.question.append(dns.rrset.RRset(draw(names), draw(st.sampled_from([IN, CH])), draw(u16)))
    for section in (m.answer, m.authority, m.additional):
        for name, ttl, rd in draw(st.lists(records, max_size=4)):
            section.append(dns.rrset.from_rdata(name, ttl, rd))
    if draw(st.booleans()):
        options = [
            dns.edns.GenericOption(code, data)
            for code, data in draw(
                st.lists(
                    st.tuples(st.sampled_from([3, 65001, 20292]), st.binary(max_size=8)), max_size=3
                )
            )
        ]
        m.use_edns(
            edns=draw(st.integers(0, 255)),
            ednsflags=draw(st.sampled_from([0, 0x8000, 0x8123])),
            payload=draw(st.integers(512, 0xFFFF)),
            options=options,
        )
        m.set_rcode(draw(st.integers(0, 4095)))
    else:
        m.set_rcode(draw(st.integers(0, 15)))
    return m


def _expected_rdata(rd: dns.rdata.Rdata) -> Any:  # noqa: PLR0911
    t, c = int(rd.rdtype), int(rd.rdclass)
    if c == IN and t == 1:
        return rd.address
    if c == IN and t == 28:
        return ipaddress.IPv6Address(rd.address)
    if t in {2, 5, 12, 39}:
        return rd.target.to_text()
    if t == 15:
        return (rd.preference, rd.exchange.to_text())
    if c == IN and t == 33:
        return (rd.priority, rd.weight, rd.port, rd.target.to_text())
    if t == 6:
        return (
            rd.mname.to_text(),
            rd.rname.to_text(),
            rd.serial,
            rd.refresh,
            rd.retry,
            rd.expire,
            rd.minimum,
        )
    if t == 16:
        return list(rd.strings)
    if isinstance(rd, dns.rdata.GenericRdata):
        return rd.data
    return None  # a type dnspython decodes and we keep raw: compared by type only


def _ours(rdata: Any, rtype: int, rclass: int) -> Any:
    if rclass == IN and rtype == 28:
        return ipaddress.IPv6Address(rdata)
    return rdata


def _records(section: list[dns.rrset.RRset]) -> list[tuple[Any, ...]]:
    out = []
    for rrset in section:
        for rd in rrset:
            out.append(
                (
                    rrset.name.to_text(),
                    int(rd.rdtype),
                    int(rd.rdclass),
                    rrset.ttl,
                    _expected_rdata(rd),
                )
            )
    return out


def assert_same(wire: bytes, d: dns.message.Message) -> None:
    m = parse_message(wire)
    flags = int(d.flags)
    assert (m.id, m.opcode, m.rcode) == (d.id, int(d.opcode()), int(d.rcode()))
    assert (m.qr, m.aa, m.tc, m.rd, m.ra, m.ad, m.cd) == tuple(
        bool(flags & f)
        for f in (
            dns.flags.QR,
            dns.flags.AA,
            dns.flags.TC,
            dns.flags.RD,
            dns.flags.RA,
            dns.flags.AD,
            dns.flags.CD,
        )
    )
    assert [(q.name, q.qtype, q.qclass) for q in m.questions] == [
        (r.name.to_text(), int(r.rdtype), int(r.rdclass)) for r in d.question
    ]
    for ours, theirs in (
        (m.answers, d.answer),
        (m.authority, d.authority),
        (m.additional, d.additional),
    ):
        want = _records(theirs)
        assert len(ours) == len(want)
        got = [(r.name, r.rtype, r.rclass, r.ttl, _ours(r.rdata, r.rtype, r.rclass)) for r in ours]
        got = [g if w[4] is not None else (*g[:4], None) for g, w in zip(got, want, strict=True)]
        assert got == want
    if d.edns < 0:
        assert m.edns is None
    else:
        assert m.edns is not None
        assert (m.edns.udp_size, m.edns.version, m.edns.dnssec_ok, m.edns.ext_rcode) == (
            d.payload,
            d.edns,
            bool(d.ednsflags & dns.flags.DO),
            (d.ednsflags >> 24) & 0xFF,
        )
        assert [c for c, _ in m.edns.options] == [int(o.otype) for o in d.options]
        for (_, data), o in zip(m.edns.options, d.options, strict=True):
            if isinstance(o, dns.edns.GenericOption):
                assert data == o.data


@given(messages())
def test_dnspython_built_messages_parse_equal(msg: dns.message.Message) -> None:
    wire = msg.to_wire(max_size=65535)
    assert_same(wire, dns.message.from_wire(wire, one_rr_per_rrset=True))


def _dnspython_may_reject_more(m: Any) -> bool:
    """True when a message we accept holds something dnspython validates further (see top)."""
    for r in (*m.answers, *m.authority, *m.additional):
        if r.rtype == TSIG or not (
            r.rtype in DECODED_ANY_CLASS or (r.rtype in DECODED_IN_ONLY and r.rclass == IN)
        ):
            return True
    return m.edns is not None and bool(m.edns.options)


def check_bytes(wire: bytes) -> None:
    if len(wire) >= 3 and (wire[2] >> 3) & 0xF == dns.opcode.UPDATE:
        return  # RFC 2136 section rules: see the module docstring
    try:
        d = dns.message.from_wire(wire, one_rr_per_rrset=True)
    except (dns.exception.DNSException, ValueError, TypeError, UnicodeError, KeyError) as e:
        d_err: Exception | None = e
    else:
        d_err = None
    try:
        m = parse_message(wire)
    except WireError as e:
        assert d_err is not None, f"we reject what dnspython accepts: {e}"
        return
    if d_err is None:
        assert_same(wire, d)
    else:
        assert _dnspython_may_reject_more(m), f"we accept what dnspython rejects: {d_err!r}"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(messages()).to_wire(max_size=65535))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "pointer"]))
        if not wire:
            break
        i = draw(st.integers(0, len(wire) - 1))
        if op == "flip":
            wire[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            wire[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del wire[i:]
        elif op == "insert":
            wire[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del wire[i]
        else:
            wire[i : i + 2] = (0xC000 | draw(st.integers(0, len(wire)))).to_bytes(2, "big")
    return bytes(wire)


@given(mutated())
@example(b"")
@example(b"\x00" * 11)
@example(b"\x00" * 12 + b"\x00")
@example(bytes.fromhex("0000 0000 0001 0000 0000 0000 c00e 0001 0001"))
def test_mutated_bytes_agree(wire: bytes) -> None:
    check_bytes(wire)


@given(st.binary(max_size=80))
def test_random_bytes_agree(wire: bytes) -> None:
    check_bytes(wire)


@pytest.mark.parametrize(
    "text",
    [
        "www.Example.COM.",
        "a\\.b.example.com.",
        "\\000\\255\\032.x.",
        '\\"\\(\\)\\;\\@\\$\\\\.',
        ".",
    ],
)
def test_names_print_like_dnspython(text: str) -> None:
    q = dns.message.make_query(dns.name.from_text(text), "A")
    assert (
        parse_message(q.to_wire(max_size=65535)).questions[0].name
        == text
        == q.question[0].name.to_text()
    )
