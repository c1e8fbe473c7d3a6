"""The project as the person at the terminal meets it: the Makefile and the README's
prerequisites, configuration and file errors, start-up warnings, ``check --to``, ``cache list``,
``intercept`` on a clean node, and the demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import dns.message
import pytest
from fqdnguard import Endpoints, Policy
from fqdnguard.backends import make_backend
from fqdnguard.config import ConfigError, ProxyConfig
from fqdnguard.daemons.run import Runner
from fqdnguard.proxy import Proxy
from fqdnguard.testing import KnotServer, free_port

from tests.proxy_fixtures import ENDPOINTS, FREE_IP, POLICY, files_config, udp_ask
from tests.proxy_fixtures import run as run_loop
from tests.test_policy_cli import run

ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- make: a project venv, and a demo that installs only what it uses --------------------------


def make_n(*args: str) -> list[str]:
    """The commands ``make`` would run (dry run, nothing is executed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "--no-print-directory", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return r.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [ln for ln in lines if re.search(r"\bpip\b.* install\b", ln)]


@pytest.mark.parametrize("target", ["deps", "build-dev", "demo", "test"])
def test_make_installs_into_the_project_venv(target: str) -> None:
    lines = make_n(target, "VENV=.venv")
    pips = installs(lines)
    assert pips, lines
    for ln in pips:
        assert ln.startswith(".venv/bin/python -m pip install"), ln
    runs = [ln for ln in lines if re.search(r"\bpython3?\b", ln) and ln not in pips]
    for ln in [ln for ln in runs if not ln.startswith("missing=")]:  # the Debian packages
        # The venv is made from the machine's python3; everything else runs the venv's.
        assert ln.startswith((".venv/bin/python ", "python3 -m venv ")), ln


def test_make_python_stays_overridable() -> None:
    lines = make_n("deps", "PYTHON=/opt/py/bin/python3")
    assert all(ln.startswith("/opt/py/bin/python3 -m pip") for ln in installs(lines))
    assert not any(" -m venv " in ln for ln in lines), "no venv is made for another PYTHON"


def test_make_demo_installs_only_what_the_demo_uses() -> None:
    demo = "\n".join(make_n("demo"))
    for unused in ("dnsperf", "dnsdist", "hypothesis", "pytest", "matplotlib", "mypy", "ruff"):
        assert unused not in demo, unused
    assert "knot" in demo


def test_readme_names_the_prerequisites_and_what_the_demo_installs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Commands") : readme.index("```sh\nmake test")]
    for needed in ("Linux", "root", "apt-get", "Rust toolchain", ".venv", "nftables"):
        assert needed in section, needed
    pairs = re.search(r"for b in (.*?); do", "\n".join(make_n("demo-deps")))
    assert pairs is not None
    for pkg in [p.split(":")[1] for p in pairs.group(1).split()]:
        assert f"`{pkg}`" in section, pkg


# -- configuration and policy errors: file, line, every problem at once ------------------------

BAD_CONFIG = """\
listen: ["127.0.0.1:5353"]
upstreams: ["nope:53"]
backend: iptables
max-inflight: -3
colour: blue
hold_max: soon
reject: refused
reject: nxdomain
"""


def test_config_errors_name_the_file_and_line_and_come_all_at_once(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "fqdnguard.yaml"
    cfg.write_text(BAD_CONFIG)
    r = run("run", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    expected = [
        f"fqdnguard: error: {cfg}:2: upstreams: 'nope:53': 'nope' is not an IP address",
        f"fqdnguard: error: {cfg}:3: backend: 'iptables': choose callback, log or nftables",
        f"fqdnguard: error: {cfg}:4: max_inflight: -3 is not a whole number",
        f"fqdnguard: error: {cfg}:5: unknown option 'colour'",
        f"fqdnguard: error: {cfg}:6: hold_max: 'soon' is not a number",
        f"fqdnguard: error: {cfg}:8: reject: given twice",
    ]
    assert len(lines) == len(expected), r.stderr
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(want), (line, want)


def test_config_checks_of_valid_types_are_reported_with_conversion_errors() -> None:

    with pytest.raises(ConfigError) as e:
        ProxyConfig.from_mapping(
            {"reject": "maybe", "upstream_sockets": 20_000, "log_sample": "x"},
            source="f.yaml",
            lines={"reject": 3, "upstream_sockets": 4, "log_sample": 5},
        )
    assert e.value.problems == [
        "f.yaml:5: log_sample: 'x' is not a number",
        "f.yaml:3: reject: 'maybe': choose refused or nxdomain",
        "f.yaml:4: upstream_sockets: 20000: at most 16384 (each is a descriptor)",
    ]


BAD_ENTRIES = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toFQDNs:
    - matchName: "bad name"
      matchPatern: "*.x.com"
    - matchPattern: "a..b"
      matchName: "x.com"
    toPorts:
    - ports:
      - port: "99999"
        protocol: ICMPX
        bogus: 1
"""


def test_lint_reports_every_problem_of_an_entry(tmp_path: pathlib.Path) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text(BAD_ENTRIES)
    r = run("policy", "lint", str(pol))
    assert r.returncode == 2
    got = [ln.removeprefix(f"{pol}:") for ln in r.stdout.splitlines()]
    e = "spec.egress[0]"
    assert [ln.split(" ", 2)[:2] for ln in got] == [
        ["8:", f"{e}.toFQDNs[0].matchName:"],
        ["9:", f"{e}.toFQDNs[0].matchPatern:"],
        ["10:", f"{e}.toFQDNs[1]:"],
        ["10:", f"{e}.toFQDNs[1].matchPattern:"],
        ["14:", f"{e}.toPorts[0].ports[0].port:"],
        ["15:", f"{e}.toPorts[0].ports[0].protocol:"],
        ["16:", f"{e}.toPorts[0].ports[0].bogus:"],
    ], r.stdout
    assert "8 error(s)" not in r.stderr and "7 error(s), 0 warning(s)" in r.stderr


# -- a missing file: named, with no `:0:` and no errno text ------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["policy", "lint", "{d}/nope.yaml"], "{d}/nope.yaml: no such file or directory"),
        (["check", "--policy", "{d}/nope", "--endpoints", "{e}", "--ip", "10.244.1.5", "--name",
          "a.b"], "{d}/nope: no such file or directory"),
        (["check", "--policy", "{p}", "--endpoints", "{d}/eps.yaml", "--ip", "10.244.1.5",
          "--name", "a.b"], "{d}/eps.yaml: no such file or directory"),
        (["check", "--policy", "{p}", "--endpoints", "{d}", "--ip", "10.244.1.5", "--name", "a.b"],
         "{d}: is a directory, not a file"),
        (["run", "--config", "{d}/cfg.yaml"], "--config {d}/cfg.yaml: no such file or directory"),
        (["cache", "list", "--state-dir", "{d}/state"],
         "state directory {d}/state: no such directory"),
        (["policy", "status", "--state-dir", "{d}/state"],
         "state directory {d}/state: no such directory"),
    ],
)  # fmt: skip
def test_a_missing_file_gets_a_clear_error(
    tmp_path: pathlib.Path, args: list[str], message: str
) -> None:
    fill = {"d": str(tmp_path), "e": str(ROOT / "examples/endpoints.yaml"),
            "p": str(ROOT / "examples/policies")}  # fmt: skip
    r = run(*[a.format(**fill) for a in args])
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert message.format(**fill) in out, out
    assert ":0:" not in out and "Errno" not in out, out


# -- start-up: what the log says about how queries will be decided ------------------------------


@pytest.mark.parametrize(
    ("endpoints", "unknown", "warned"),
    [("none", None, True), ("some", None, False), ("fallback", "default/pod", False)],
)
def test_start_says_how_queries_will_be_decided(
    caplog: pytest.LogCaptureFixture, endpoints: str, unknown: str | None, warned: bool
) -> None:

    texts = {
        "none": "endpoints: []",
        "some": ENDPOINTS,
        # An endpoint with no address: unknown sources are treated as it, none is refused.
        "fallback": "endpoints: [{name: pod, namespace: default, labels: {app: pod}}]",
    }
    eps = Endpoints.from_yaml(texts[endpoints])
    policy = Policy.from_yaml(POLICY, endpoints=eps)
    port = free_port()
    config = ProxyConfig(listen=[("127.0.0.1", port)], upstreams=[("127.0.0.53", 5399)],
                         unknown_endpoint=unknown, log_queries="none")  # fmt: skip
    proxy = Proxy(policy, eps, backend=make_backend("log"), config=config)

    async def scenario() -> None:
        with caplog.at_level(logging.INFO, logger="fqdnguard.proxy"):
            await proxy.start()
            await proxy.stop()

    run_loop(scenario)
    text = [r.getMessage() for r in caplog.records if r.name == "fqdnguard.proxy"]
    warning = [t for t in text if "every query will be refused" in t]
    assert bool(warning) == warned, text
    if warned:
        assert "unknown source" in warning[0] and "--unknown-endpoint" in warning[0]
    assert any("direct-listen mode" in t and "127.0.0.53 port 53" in t for t in text), text


# -- check --to: egress verdicts from the command line -----------------------------------------

WEB = ["--ip", "10.244.1.5"]


@pytest.mark.parametrize(
    ("args", "code", "first", "reason"),
    [
        ([*WEB, "--to", "140.82.112.3:443", "--name", "api.github.com"], 0,
         "ALLOWED: traffic from default/web-6d4cf56db6-abcde (10.244.1.5) to 140.82.112.3 (known "
         "as api.github.com) port 443/TCP",
         'toFQDNs[0].matchName: "api.github.com" matches api.github.com'),
        ([*WEB, "--to", "140.82.112.3:443"], 1,
         "DENIED: traffic from default/web-6d4cf56db6-abcde (10.244.1.5) to 140.82.112.3 port "
         "443/TCP", "the DNS cache holds no name for the address"),
        ([*WEB, "--to", "140.82.112.3:443", "--name", "evil.com"], 1, "DENIED",
         "(evil.com) match no toFQDNs selector"),
        ([*WEB, "--to", "140.82.112.3:80/tcp", "--name", "api.github.com"], 1, "DENIED", "port 80"),
        ([*WEB, "--to", "10.96.0.10:53/udp"], 0,
         "ALLOWED: traffic from default/web-6d4cf56db6-abcde (10.244.1.5) to 10.96.0.10 port "
         "53/UDP", "toEndpoints admits traffic to 10.96.0.10 port 53/UDP"),
        (["--labels", "app=web,io.kubernetes.pod.namespace=default", "--to", "[2001:db8::1]:443",
          "--name", "api.github.com"], 0, "ALLOWED: traffic from labels", "matches api.github.com"),
    ],
)  # fmt: skip
def test_check_to_gives_egress_verdicts(
    args: list[str], code: int, first: str, reason: str
) -> None:
    r = run("check", "--policy", str(ROOT / "examples/policies"), "--endpoints",
            str(ROOT / "examples/endpoints.yaml"), *args)  # fmt: skip
    assert r.returncode == code, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(first), lines
    assert reason in lines[1], lines


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("1.2.3.4", "'1.2.3.4': a port is required"),
        ("1.2.3.4:5/icmp", "protocol must be tcp, udp or sctp"),
        ("host:443", "'host' is not an IP address"),
    ],
)
def test_check_to_names_a_bad_destination(to: str, message: str) -> None:
    r = run("check", "--policy", str(ROOT / "examples/policies"), "--endpoints",
            str(ROOT / "examples/endpoints.yaml"), *WEB, "--to", to)  # fmt: skip
    assert r.returncode == 2
    assert "argument --to: " in r.stderr and message in r.stderr, r.stderr


# -- cache list: endpoints by namespace/name, filters by endpoint and name ----------------------


async def _cli(*args: str) -> tuple[int, str, str]:
    """The CLI in a subprocess, the event loop serving the proxy meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fqdnguard.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _rows(out: str) -> list[tuple[str, str, str]]:
    """(endpoint, name, ip) of each row of the table."""
    return [(r.split()[0], r.split()[1], r.split()[-1]) for r in out.splitlines()[1:]]


def test_cache_list_names_endpoints_and_filters(knot: KnotServer, tmp_path: pathlib.Path) -> None:
    config = files_config(tmp_path, knot.port)
    port, state = config.listen[0][1], str(config.state_dir)
    www = {("default/pod", "www.example.com.", "192.0.2.10"),
           ("default/pod", "www.example.com.", "192.0.2.11")}  # fmt: skip
    short = ("default/free", "short.example.com.", "192.0.2.30")

    async def scenario() -> None:
        runner = Runner(config)
        await runner.start()
        try:
            server = ("127.0.0.1", port)
            await udp_ask(server, dns.message.make_query("www.example.com", "A").to_wire())
            query = dns.message.make_query("short.example.com", "A").to_wire()
            await udp_ask(server, query, source=FREE_IP)
            code, out, err = await _cli("cache", "list", "--state-dir", state)
            assert code == 0, err
            assert set(_rows(out)) == {*www, short}, out
            assert out.splitlines()[0].split()[0] == "Endpoint"
            for args, want in [
                (["--endpoint", "default/pod"], www),
                (["--endpoint", "free"], {short}),
                (["--name", "short"], {short}),
                (["--name", "*.example.com"], {*www, short}),
                (["--name", "WWW.example"], www),
                (["--endpoint", "default/pod", "--name", "short"], set()),
            ]:
                code, out, err = await _cli("cache", "list", "--state-dir", state, *args)
                assert code == 0, err
                assert set(_rows(out)) == want, (args, out)
            code, out, err = await _cli("cache", "list", "--state-dir", state, "--endpoint", "x/y")
            assert code == 2
            assert "--endpoint x/y: no such endpoint (endpoints: default/free" in err
        finally:
            await runner.stop()

    run_loop(scenario)
    # Stopped: the saved cache, named by the endpoints file, or else by id.
    r = run("cache", "list", "--state-dir", state, "--endpoints", str(tmp_path / "endpoints.yaml"))
    assert r.returncode == 0 and set(_rows(r.stdout)) == {*www, short}, r.stderr
    r = run("cache", "list", "--state-dir", state, "--json", "--name", "short")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines()]  # NDJSON: one per line
    assert [(e["endpoint"], e["endpoint_name"]) for e in listed] == [(3, None)]


# -- intercept status / cleanup on a node where interception was never installed ---------------


def test_intercept_status_and_cleanup_on_a_clean_node() -> None:
    from tests.netns import netns_unavailable, sh  # noqa: PLC0415

    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    ns = f"fgclean{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")

        def node(*args: str) -> subprocess.CompletedProcess[str]:
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "fqdnguard.cli", *args]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

        r = node("intercept", "status")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"table": False, "rules": 0, "policed4": 0,
            "policed6": 0, "ip_rules4": 0, "routes4": 0, "ip_rules6": 0, "routes6": 0}  # fmt: skip
        r = node("intercept", "cleanup")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("removed: table absent, ip rules 0 (IPv4) 0 (IPv6)"), r.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


# -- the demo: why each refusal happened; enforcement as root -----------------------------------


def test_demo_explains_refusals_and_shows_enforcement() -> None:
    from tests.netns import netns_unavailable  # noqa: PLC0415
    from tests.proxy_fixtures import require_knot  # noqa: PLC0415

    require_knot()
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples/demo.py")],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("who "))) :]
    refused = [i for i, ln in enumerate(table) if re.search(r"udp  (REFUSED|NXDOMAIN)$", ln)]
    assert len(refused) == 5, r.stdout
    for i in refused:
        assert table[i + 1].strip().startswith("why: denied: "), table[i : i + 2]
    assert "why: denied: the source is not a known endpoint" in r.stdout
    assert "under the search domain svc.cluster.local" in r.stdout
    if netns_unavailable() is not None:
        assert "== enforcement: skipped" in r.stdout
        return
    assert "pod -> 10.77.2.10:443 (the resolved IP): connected" in r.stdout
    assert "pod -> 10.77.2.11:443 (another IP): no connection (dropped by nftables)" in r.stdout
    assert "pod -> 10.77.2.10:443 before resolving anything: no connection" in r.stdout
    assert "DENIED: traffic from default/web (10.77.1.2) to 10.77.2.11 port 443/TCP" in r.stdout
