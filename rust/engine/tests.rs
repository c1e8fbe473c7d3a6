//! The engine over hand-built packets, a real compiled policy and a real cache.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use hashbrown::HashMap;

use super::*;
use crate::cache::{Cache, ChangeKind, Config};
use crate::pattern::{parse_match_name, parse_match_pattern};
use crate::policy::{EgressRule, NameSel, Peers, PortEntry, PortRange, Spec};

const RESOLVER: &str = "10.96.0.10";
const POD: &str = "10.0.0.5";
const FREE: &str = "10.0.0.9";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn sel(text: &str, pattern: bool) -> NameSel {
    let parsed = if pattern {
        parse_match_pattern(text)
    } else {
        parse_match_name(text)
    };
    NameSel {
        parsed: parsed.expect("valid"),
        is_pattern: pattern,
        text: text.into(),
    }
}

/// POD may ask RESOLVER on 53/UDP for `*.example.com` and `api.github.com`; FREE is selected by
/// no policy.
fn table(unknown: Option<EndpointRef>) -> PolicyTable {
    let rule = EgressRule {
        index: 0,
        fqdns: vec![],
        peers: Peers::Listed {
            ips: [ip(RESOLVER)].into_iter().collect(),
            cidrs: vec![],
        },
        ports: vec![PortEntry {
            ranges: vec![PortRange::new(53, 0, Proto::Udp)],
            dns: Some(vec![
                sel("*.example.com", true),
                sel("api.github.com", false),
            ]),
        }],
    };
    let spec = Spec {
        policy: "default/dns".into(),
        label: "test".into(),
        default_deny: true,
        egress: vec![rule],
    };
    let policy = PolicySet::new(vec![spec]).expect("valid policy");
    let pod = policy.identity(&[0]).expect("identity");
    let mut by_ip = HashMap::new();
    by_ip.insert(
        ip(POD),
        EndpointRef {
            id: 5,
            identity: Some(pod),
        },
    );
    by_ip.insert(
        ip(FREE),
        EndpointRef {
            id: 9,
            identity: None,
        },
    );
    PolicyTable {
        policy: Arc::new(policy),
        by_ip,
        unknown,
    }
}

fn engine_with(config: EngineConfig) -> (Engine, Arc<RwLock<Cache>>) {
    let cache = Arc::new(RwLock::new(Cache::new(
        Config::new(0, 1000, 100_000).expect("config"),
    )));
    (
        Engine::new(config, Arc::clone(&cache), table(None)).expect("engine"),
        cache,
    )
}

fn config() -> EngineConfig {
    EngineConfig {
        reject: Reject::Refused,
        search_domains: vec![],
        max_inflight: 100,
        timeout: 2.0,
        log: LogMode::All,
    }
}

fn name_wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    for w in [id, 0x0100, 1, 0, 0, 0] {
        q.extend_from_slice(&w.to_be_bytes());
    }
    q.extend(name_wire(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// An answer to `name`: a CNAME to `target` when given, then A records for the last name.
fn answer(id: u16, name: &str, target: Option<&str>, addrs: &[[u8; 4]], ttl: u32) -> Vec<u8> {
    let mut a = Vec::new();
    let count = addrs.len() as u16 + u16::from(target.is_some());
    for w in [id, 0x8180, 1, count, 0, 0] {
        a.extend_from_slice(&w.to_be_bytes());
    }
    a.extend(name_wire(name));
    a.extend_from_slice(&[0, 1, 0, 1]);
    let mut owner = name_wire(name);
    if let Some(t) = target {
        let rdata = name_wire(t);
        a.extend(&owner);
        a.extend_from_slice(&[0, 5, 0, 1]);
        a.extend_from_slice(&ttl.to_be_bytes());
        a.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        a.extend(&rdata);
        owner = rdata;
    }
    for addr in addrs {
        a.extend(&owner);
        a.extend_from_slice(&[0, 1, 0, 1]);
        a.extend_from_slice(&ttl.to_be_bytes());
        a.extend_from_slice(&[0, 4]);
        a.extend_from_slice(addr);
    }
    a
}

fn ask(e: &Engine, src: &str, data: &[u8], now: f64) -> (QueryAction, Option<LogRecord>) {
    e.query(ip(src), ip(RESOLVER), 53, Proto::Udp, data, 0, now)
        .expect("engine")
}

fn rcode(bytes: &[u8]) -> u16 {
    u16::from(bytes[3] & 0x0f)
}

fn forwarded(action: QueryAction) -> (Vec<u8>, u64) {
    match action {
        QueryAction::Forward { bytes, token } => (bytes, token),
        other => panic!("expected a forward, got {other:?}"),
    }
}

fn replied(action: QueryAction) -> Vec<u8> {
    match action {
        QueryAction::Reply { bytes } => bytes,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn allowed_query_is_forwarded_with_a_fresh_id_and_the_answer_restored() {
    let (e, cache) = engine_with(config());
    let q = query(0x1234, "www.Example.com", 1);
    let (up, token) = forwarded(ask(&e, POD, &q, 100.0).0);
    assert_eq!(&up[2..], &q[2..], "only the id changes");
    let upstream_id = u16::from_be_bytes([up[0], up[1]]);
    let a = answer(
        upstream_id,
        "www.example.com",
        Some("edge.cdn.net"),
        &[[192, 0, 2, 1], [192, 0, 2, 2]],
        60,
    );
    let got = e.response(0, &a, 100.5).expect("engine").expect("matched");
    assert_eq!(got.token, token);
    assert_eq!(&got.bytes[..2], &[0x12, 0x34]);
    assert_eq!(&got.bytes[2..], &a[2..]);
    assert!(got.has_addresses);
    // Programmed to lapse at twice the granted time (see `program`).
    let added: Vec<_> = got
        .changes
        .iter()
        .map(|c| (c.kind, c.endpoint, c.ip, c.expires_at))
        .collect();
    assert_eq!(
        added,
        vec![
            (ChangeKind::Added, 5, ip("192.0.2.1"), 220.5),
            (ChangeKind::Added, 5, ip("192.0.2.2"), 220.5)
        ]
    );
    assert!(cache
        .read()
        .expect("lock")
        .allowed(5, ip("192.0.2.1"), 101.0));
    let log = got.log.expect("log all");
    assert_eq!(
        (log.qname.as_str(), log.verdict, log.rcode),
        ("www.Example.com.", Verdict::Allowed, 0)
    );
    assert_eq!(log.answers, vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    // The same answer again is not pending any more.
    assert!(e.response(0, &a, 100.6).expect("engine").is_none());
    let s = e.stats().expect("stats");
    assert_eq!(
        (s.queries, s.allowed, s.dropped_unmatched, s.inflight),
        (1, 1, 1, 0)
    );
}

#[test]
fn denied_queries_are_refused_or_nxdomain() {
    let (e, _) = engine_with(config());
    let q = query(7, "evil.org", 1);
    let r = replied(ask(&e, POD, &q, 1.0).0);
    assert_eq!((&r[..2], rcode(&r), r[2] & 0x80), (&[0u8, 7][..], 5, 0x80));
    // A server the rule does not admit is denied too.
    let (action, _) = e
        .query(
            ip(POD),
            ip("8.8.8.8"),
            53,
            Proto::Udp,
            &query(8, "www.example.com", 1),
            0,
            1.0,
        )
        .expect("engine");
    assert_eq!(rcode(&replied(action)), 5);
    let (e, _) = engine_with(EngineConfig {
        reject: Reject::NxDomain,
        ..config()
    });
    assert_eq!(rcode(&replied(ask(&e, POD, &q, 1.0).0)), 3);
    let suffix = LabelBuf::from_presentation(b"svc.cluster.local").expect("name");
    let (e, _) = engine_with(EngineConfig {
        search_domains: vec![suffix],
        ..config()
    });
    assert_eq!(
        rcode(&replied(
            ask(
                &e,
                POD,
                &query(9, "api.github.com.svc.cluster.local", 1),
                1.0
            )
            .0
        )),
        3
    );
    assert_eq!(rcode(&replied(ask(&e, POD, &q, 1.0).0)), 5);
    forwarded(ask(&e, POD, &query(10, "api.github.com", 1), 1.0).0);
    assert_eq!(e.stats().expect("stats").denied, 2);
}

#[test]
fn unrestricted_and_unknown_sources() {
    let (e, _) = engine_with(config());
    forwarded(ask(&e, FREE, &query(1, "anything.org", 1), 1.0).0);
    let r = replied(ask(&e, "10.9.9.9", &query(2, "www.example.com", 1), 1.0).0);
    assert_eq!(rcode(&r), 5);
    assert_eq!(e.stats().expect("stats").unknown_source, 1);
    let mut t = table(Some(EndpointRef {
        id: 77,
        identity: None,
    }));
    t.unknown = Some(EndpointRef {
        id: 77,
        identity: None,
    });
    e.set_table(t).expect("swap");
    forwarded(ask(&e, "10.9.9.9", &query(3, "www.example.com", 1), 1.0).0);
}

#[test]
fn malformed_queries_never_reach_the_upstream() {
    let (e, _) = engine_with(config());
    assert!(matches!(
        ask(&e, POD, b"\x01\x02\x03", 1.0).0,
        QueryAction::Drop
    ));
    let mut resp = query(3, "www.example.com", 1);
    resp[2] |= 0x80;
    assert!(
        matches!(ask(&e, POD, &resp, 1.0).0, QueryAction::Drop),
        "responses are never answered"
    );
    let mut two = query(4, "www.example.com", 1);
    two[5] = 2;
    let r = replied(ask(&e, POD, &two, 1.0).0);
    assert_eq!((rcode(&r), &r[..2]), (1, &[0u8, 4][..]));
    let mut notify = query(5, "www.example.com", 1);
    notify[2] = (notify[2] & 0x87) | (4 << 3);
    assert_eq!(rcode(&replied(ask(&e, POD, &notify, 1.0).0)), 4);
    let mut truncated = query(6, "www.example.com", 1);
    truncated.truncate(20);
    assert_eq!(rcode(&replied(ask(&e, POD, &truncated, 1.0).0)), 1);
    assert_eq!(e.stats().expect("stats").malformed, 5);
}

#[test]
fn spoofed_and_mismatched_answers_are_dropped() {
    let (e, _) = engine_with(config());
    let (up, token) = forwarded(ask(&e, POD, &query(1, "www.example.com", 1), 1.0).0);
    let id = u16::from_be_bytes([up[0], up[1]]);
    let good = answer(id, "www.example.com", None, &[[192, 0, 2, 7]], 30);
    assert!(e
        .response(
            0,
            &answer(id ^ 1, "www.example.com", None, &[[6, 6, 6, 6]], 30),
            1.1
        )
        .expect("e")
        .is_none());
    assert!(
        e.response(1, &good, 1.1).expect("e").is_none(),
        "another channel"
    );
    assert!(e
        .response(
            0,
            &answer(id, "evil.example.com", None, &[[6, 6, 6, 6]], 30),
            1.1
        )
        .expect("e")
        .is_none());
    assert!(
        e.response(0, &good[..good.len() - 2], 1.1)
            .expect("e")
            .is_none(),
        "malformed"
    );
    let got = e
        .response(0, &good, 1.2)
        .expect("e")
        .expect("the real answer still matches");
    assert_eq!(got.token, token);
    let s = e.stats().expect("stats");
    assert_eq!(
        (s.dropped_unmatched, s.dropped_mismatch, s.dropped_malformed),
        (2, 1, 1)
    );
}

#[test]
fn timeouts_answer_servfail_and_overload_is_refused_with_servfail() {
    let (e, _) = engine_with(EngineConfig {
        max_inflight: 1,
        ..config()
    });
    let q = query(0x4242, "www.example.com", 1);
    let (up, token) = forwarded(ask(&e, POD, &q, 10.0).0);
    assert_eq!(
        rcode(&replied(
            ask(&e, POD, &query(2, "a.example.com", 1), 10.5).0
        )),
        2
    );
    assert!(e.sweep(11.9).expect("sweep").is_empty());
    let expired = e.sweep(12.0).expect("sweep");
    assert_eq!(expired.len(), 1);
    assert_eq!((expired[0].token, rcode(&expired[0].bytes)), (token, 2));
    assert_eq!(&expired[0].bytes[..2], &[0x42, 0x42]);
    let id = u16::from_be_bytes([up[0], up[1]]);
    assert!(e
        .response(
            0,
            &answer(id, "www.example.com", None, &[[1, 2, 3, 4]], 9),
            12.1
        )
        .expect("e")
        .is_none());
    let s = e.stats().expect("stats");
    assert_eq!((s.timeouts, s.overloaded, s.inflight), (1, 1, 0));
}

#[test]
fn cancel_forgets_a_pending_query() {
    let (e, _) = engine_with(config());
    let (up, token) = forwarded(ask(&e, POD, &query(1, "www.example.com", 1), 1.0).0);
    assert!(e.cancel(token).expect("e"));
    assert!(!e.cancel(token).expect("e"));
    let id = u16::from_be_bytes([up[0], up[1]]);
    assert!(e
        .response(
            0,
            &answer(id, "www.example.com", None, &[[1, 2, 3, 4]], 9),
            1.1
        )
        .expect("e")
        .is_none());
}

#[test]
fn upstream_ids_do_not_repeat_while_pending() {
    let (e, _) = engine_with(EngineConfig {
        max_inflight: 70_000,
        ..config()
    });
    let mut seen = std::collections::HashSet::new();
    for i in 0..5000u16 {
        let (up, _) = forwarded(ask(&e, FREE, &query(i, "x.org", 1), 1.0).0);
        assert!(
            seen.insert(u16::from_be_bytes([up[0], up[1]])),
            "id reused while pending"
        );
    }
}

#[test]
fn firewall_elements_are_refreshed_about_once_per_ttl() {
    let (e, _) = engine_with(config());
    let round = |now: f64, ttl: u32| {
        let (up, _) = forwarded(ask(&e, POD, &query(1, "www.example.com", 1), now).0);
        let id = u16::from_be_bytes([up[0], up[1]]);
        let a = answer(id, "www.example.com", None, &[[192, 0, 2, 1]], ttl);
        let got = e.response(0, &a, now).expect("engine").expect("matched");
        (
            got.hold,
            got.changes
                .iter()
                .map(|c| (c.kind, c.expires_at))
                .collect::<Vec<_>>(),
        )
    };
    // Programmed to lapse at twice the granted time: 100 + 100.
    assert_eq!(round(0.0, 100), (true, vec![(ChangeKind::Added, 200.0)]));
    // The cache now expires at 110 and 190: both within what the firewall already allows.
    assert_eq!(round(10.0, 100), (false, vec![]));
    assert_eq!(round(90.0, 100), (false, vec![]));
    // 250 is past 200: the element is refreshed (to 250 + 100), and the answer need not wait.
    assert_eq!(
        round(150.0, 100),
        (false, vec![(ChangeKind::Extended, 350.0)])
    );
    assert_eq!(e.stats().expect("stats").refreshes_skipped, 2);
    // The cache removes the entry at its own expiry (250), and says so.
    let removed = e.expire(251.0).expect("expire");
    assert_eq!(
        removed.iter().map(|c| c.kind).collect::<Vec<_>>(),
        vec![ChangeKind::Removed]
    );
    assert_eq!(round(300.0, 10), (true, vec![(ChangeKind::Added, 320.0)]));
}

#[test]
fn programmed_state_lists_each_live_pair_once_with_its_latest_expiry() {
    let (e, cache) = engine_with(config());
    {
        let mut c = cache.write().expect("lock");
        let www = LabelBuf::from_presentation(b"www.example.com").expect("name");
        let api = LabelBuf::from_presentation(b"api.example.com").expect("name");
        c.record(
            5,
            &www,
            &[(ip("192.0.2.1"), 100), (ip("192.0.2.2"), 10)],
            0.0,
        )
        .expect("record");
        c.record(5, &api, &[(ip("192.0.2.1"), 300)], 0.0)
            .expect("record");
        c.record(9, &www, &[(ip("192.0.2.1"), 50)], 0.0)
            .expect("record");
    }
    let state = e.programmed_state(20.0).expect("state");
    let got: Vec<_> = state
        .iter()
        .map(|c| (c.kind, c.endpoint, c.ip, c.expires_at))
        .collect();
    assert_eq!(
        got,
        vec![
            // 300 s granted, 280 s left at 20: programmed to lapse at 300 + 280.
            (ChangeKind::Added, 5, ip("192.0.2.1"), 580.0),
            (ChangeKind::Added, 9, ip("192.0.2.1"), 80.0),
        ]
    );
}

#[test]
fn changes_recorded_outside_the_engine_are_programmed_as_answers_are() {
    let (e, cache) = engine_with(config());
    let www = LabelBuf::from_presentation(b"www.example.com").expect("name");
    // Records 192.0.2.1 for www at `now` straight into the cache, then programs what changed.
    let adopt = |ttl: u32, now: f64| {
        let recorded = cache
            .write()
            .expect("lock")
            .record(5, &www, &[(ip("192.0.2.1"), ttl)], now)
            .expect("record");
        assert_eq!(recorded.len(), 1, "the cache added or extended it");
        let got = e.program_changes(recorded, now).expect("program");
        got.iter()
            .map(|c| (c.kind, c.expires_at))
            .collect::<Vec<_>>()
    };
    // An addition: its lapse time doubled.
    assert_eq!(adopt(100, 0.0), vec![(ChangeKind::Added, 200.0)]);
    // An extension (to 150) the programmed lapse (200) already covers: nothing to program.
    assert_eq!(adopt(140, 10.0), vec![]);
    // One past it: programmed, never shortened.
    assert_eq!(adopt(290, 10.0), vec![(ChangeKind::Extended, 590.0)]);
}
