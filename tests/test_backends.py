"""The log backend's lines: JSON, one per change, as `json.dumps` writes the same object."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
from typing import Any

from fqdnguard._core import Change
from fqdnguard.backends import Log
from hypothesis import given
from hypothesis import strategies as st


def reference(c: Any) -> str:
    expires = round(c.expires_at, 3) if c.expires_at is not None else None
    record = {"change": c.kind, "endpoint": c.endpoint, "ip": c.ip, "expires_at": expires}
    return json.dumps(record) + "\n"


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.integers(0, 2**32 - 1).map(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}"),
)


@given(
    kind=st.sampled_from(["added", "extended", "removed"]),
    endpoint=st.integers(0, 2**32 - 1),
    ip=addresses,
    expires=st.floats(0, 1e18, allow_nan=False, allow_infinity=False),
)
def test_a_line_is_what_json_dumps_writes(
    kind: str, endpoint: int, ip: str, expires: float
) -> None:
    c = Change(kind, endpoint, ip, expires)
    line = Log.line(c)
    assert line == reference(c)
    assert json.loads(line) == {
        "change": kind, "endpoint": endpoint, "ip": c.ip, "expires_at": round(expires, 3),
    }  # fmt: skip


class Odd:
    """A change-like object whose fields JSON must escape: written through json.dumps."""

    kind = 'added"\n'
    endpoint = 7
    ip = "10.0.0.1\\"
    expires_at = None


def test_fields_json_must_escape_still_give_valid_json() -> None:
    line = Log.line(Odd())
    assert line == reference(Odd())
    assert json.loads(line)["change"] == 'added"\n'


def test_apply_writes_every_change_in_order() -> None:
    out = io.StringIO()
    changes = [Change("added", 1, "10.0.0.1", 10.0), Change("removed", 2, "2001:db8::1", 20.5)]
    asyncio.run(Log(out).apply(changes))
    assert out.getvalue() == "".join(map(reference, changes))
    assert [json.loads(x)["ip"] for x in out.getvalue().splitlines()] == ["10.0.0.1", "2001:db8::1"]
