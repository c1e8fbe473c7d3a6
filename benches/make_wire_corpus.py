"""Writes the wire benchmark corpus (benches/data/wire_{queries,answers}.bin) with dnspython.

Each file is a sequence of messages, each prefixed with its 2-byte length (DNS-over-TCP
framing). The Python bench and the criterion bench read the same files. Deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

OUT = Path(__file__).parent / "data"
SITES = [
    "www.example.com",
    "api.github.com",
    "storage.googleapis.com",
    "registry-1.docker.io",
    "pypi.org",
    "files.pythonhosted.org",
    "s3.eu-west-1.amazonaws.com",
    "login.microsoftonline.com",
    "cdn.jsdelivr.net",
    "k8s.gcr.io",
    "auth.internal.svc.cluster.local",
    "grafana.monitoring",
]


def queries(rng: random.Random) -> list[bytes]:
    out = []
    for i, site in enumerate(SITES * 2):
        q = dns.message.make_query(
            site,
            "AAAA" if i % 3 == 0 else "A",
            use_edns=0 if i % 2 == 0 else None,
            want_dnssec=i % 4 == 0,
        )
        q.id = rng.randrange(65536)
        out.append(q.to_wire())
    return out


def answers(rng: random.Random) -> list[bytes]:
    out = []
    for i, site in enumerate(SITES * 2):
        q = dns.message.make_query(site, "A", use_edns=0 if i % 2 == 0 else None)
        r = dns.message.make_response(q)
        if i % 6 == 5:  # NXDOMAIN with the zone's SOA
            r.set_rcode(dns.rcode.NXDOMAIN)
            zone = site.split(".", 1)[1]
            r.authority.append(
                dns.rrset.from_text(
                    zone + ".",
                    900,
                    "IN",
                    "SOA",
                    f"ns1.{zone}. hostmaster.{zone}. 2024 7200 900 1209600 300",
                )
            )
        else:  # a CNAME chain of 0..3 links, then 1..4 addresses
            owner = site + "."
            for k in range(i % 4):
                target = f"edge{k}.cdn{i}.example.net."
                r.answer.append(dns.rrset.from_text(owner, 300 - k, "IN", "CNAME", target))
                owner = target
            addrs = [f"192.0.{i}.{rng.randrange(1, 255)}" for _ in range(1 + i % 4)]
            r.answer.append(dns.rrset.from_text(owner, 60, "IN", "A", *addrs))
        out.append(r.to_wire(max_size=65535))
    return out


def write(name: str, msgs: list[bytes]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / name).write_bytes(b"".join(len(m).to_bytes(2, "big") + m for m in msgs))


if __name__ == "__main__":
    rng = random.Random(1035)
    write("wire_queries.bin", queries(rng))
    write("wire_answers.bin", answers(rng))
