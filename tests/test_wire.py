"""The wire API from Python: error responses, chain resolution, the exception, immutability."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from fqdnguard import (
    FqdnGuardError,
    Message,
    WireError,
    make_error_response,
    parse_message,
    resolve_answer,
)


def _query(edns: bool) -> dns.message.QueryMessage:
    q = dns.message.make_query(
        "Blocked.Example.COM", "AAAA", use_edns=0 if edns else None, want_dnssec=edns
    )
    q.flags |= dns.flags.CD
    return q


@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize(
    "rcode", [dns.rcode.REFUSED, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.FORMERR]
)
def test_error_response_reads_back_in_dnspython(rcode: int, edns: bool) -> None:
    q = _query(edns)
    r = dns.message.from_wire(make_error_response(q.to_wire(), rcode))
    assert r.id == q.id and r.rcode() == rcode
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RD and not r.flags & dns.flags.CD
    assert r.question == q.question and not r.answer
    assert (r.edns, bool(r.ednsflags & dns.flags.DO)) == ((0, True) if edns else (-1, False))


def test_error_response_rejects() -> None:
    wire = _query(False).to_wire()
    for bad in (-1, 16, 4096):
        with pytest.raises(WireError, match="rcode"):
            make_error_response(wire, bad)
    with pytest.raises(WireError, match="trailing"):
        make_error_response(wire + b"\0", 5)
    assert dns.message.from_wire(make_error_response(_query(True).to_wire(), 16)).rcode() == 16


def test_resolve_answer_follows_the_chain_only() -> None:
    q = dns.message.make_query("www.example.com", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("WWW.example.com.", 300, "IN", "CNAME", "edge.cdn.net."))
    r.answer.append(dns.rrset.from_text("edge.cdn.net.", 20, "IN", "A", "192.0.2.1"))
    r.answer.append(dns.rrset.from_text("bank.example.", 9999, "IN", "A", "203.0.113.9"))
    r.answer.append(dns.rrset.from_text("www.example.com.", 600, "IN", "AAAA", "2001:db8::1"))
    qname, addrs, chain = resolve_answer(r.to_wire())
    assert qname == "www.example.com."
    assert chain == ["www.example.com.", "edge.cdn.net."]
    assert sorted(addrs) == [("192.0.2.1", 20), ("2001:db8::1", 600)]


def test_errors_and_immutability() -> None:
    assert issubclass(WireError, FqdnGuardError) and issubclass(WireError, ValueError)
    with pytest.raises(WireError, match=r"shorter than the 12-byte header \(at byte 0\)"):
        parse_message(b"\0\0")
    with pytest.raises(WireError, match="compression pointer to 12"):
        resolve_answer(bytes.fromhex("0000 8000 0001 0000 0000 0000 c00c 0001 0001"))
    m = parse_message(_query(True).to_wire())
    assert isinstance(m, Message)
    with pytest.raises(AttributeError):
        m.id = 1  # type: ignore[misc]
    m.questions.clear()
    assert len(m.questions) == 1, "section lists are copies"
    q = m.questions[0]
    assert (q.name, q.qtype, q.qclass) == ("Blocked.Example.COM.", 28, 1)
    assert m.edns is not None and m.edns.dnssec_ok and m.edns.options == []
    assert m.cd and m.rd and not m.qr
