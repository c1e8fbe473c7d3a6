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
            ips_label: "toEndpoints".into(),
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
        max_inflight_per_client: 100,
        case_randomization: false,
        timeout: 2.0,
        retransmit: 0.0,
        retries: 0,
        log: LogMode::All,
        max_ttl: 0x7fff_ffff,
    }
}

/// The engine's answers to one upstream answer, for tests where one client waits.
trait OneAnswer {
    fn response1(&self, channel: u32, data: &[u8], now: f64)
        -> Result<Option<Answer>, EngineError>;
}

impl OneAnswer for Engine {
    fn response1(
        &self,
        channel: u32,
        data: &[u8],
        now: f64,
    ) -> Result<Option<Answer>, EngineError> {
        let mut all = self.response(channel, 0, data, now)?;
        assert!(all.len() <= 1, "one client waits: {all:?}");
        Ok(all.pop())
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
    e.query(ip(src), ip(RESOLVER), 53, Proto::Udp, data, 0, 1, now)
        .expect("engine")
}

fn rcode(bytes: &[u8]) -> u16 {
    u16::from(bytes[3] & 0x0f)
}

fn forwarded(action: QueryAction) -> (Vec<u8>, u64) {
    match action {
        QueryAction::Forward { bytes, token, .. } => (bytes, token),
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
    let got = e.response1(0, &a, 100.5).expect("engine").expect("matched");
    assert_eq!(got.token, token);
    assert_eq!(&got.bytes[..2], &[0x12, 0x34]);
    // The rest as the upstream sent it, but for the question: the client's own spelling.
    let qname_end = q.len() - 4;
    assert_eq!(&got.bytes[12..qname_end], &q[12..qname_end]);
    assert_eq!(&got.bytes[qname_end..], &a[qname_end..]);
    assert_eq!(&got.bytes[2..12], &a[2..12]);
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
    assert!(e.response1(0, &a, 100.6).expect("engine").is_none());
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
            1,
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
        .response1(
            0,
            &answer(id ^ 1, "www.example.com", None, &[[6, 6, 6, 6]], 30),
            1.1
        )
        .expect("e")
        .is_none());
    assert!(
        e.response1(1, &good, 1.1).expect("e").is_none(),
        "another channel"
    );
    assert!(e
        .response1(
            0,
            &answer(id, "evil.example.com", None, &[[6, 6, 6, 6]], 30),
            1.1
        )
        .expect("e")
        .is_none());
    assert!(
        e.response1(0, &good[..good.len() - 2], 1.1)
            .expect("e")
            .is_none(),
        "malformed"
    );
    let got = e
        .response1(0, &good, 1.2)
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
        .response1(
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
        .response1(
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
        max_inflight_per_client: 70_000,
        ..config()
    });
    let mut seen = std::collections::HashSet::new();
    for i in 0..5000u16 {
        // Distinct names: identical questions in flight would be merged into one.
        let name = format!("x{i}.org");
        let (up, _) = forwarded(ask(&e, FREE, &query(i, &name, 1), 1.0).0);
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
        let got = e.response1(0, &a, now).expect("engine").expect("matched");
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

fn ask_on(e: &Engine, src: &str, data: &[u8], channel: u32, slots: u16, now: f64) -> QueryAction {
    e.query(
        ip(src),
        ip(RESOLVER),
        53,
        Proto::Udp,
        data,
        channel,
        slots,
        now,
    )
    .expect("engine")
    .0
}

fn forwarded_slot(action: QueryAction) -> (Vec<u8>, u64, u16) {
    match action {
        QueryAction::Forward { bytes, token, slot } => (bytes, token, slot),
        other => panic!("expected a forward, got {other:?}"),
    }
}

/// `q` with an OPT record: buffer size `size`, DO bit `dnssec_ok`.
fn with_edns(mut q: Vec<u8>, size: u16, dnssec_ok: bool) -> Vec<u8> {
    q[11] = 1; // ARCOUNT
    q.push(0); // root owner
    q.extend_from_slice(&41u16.to_be_bytes());
    q.extend_from_slice(&size.to_be_bytes());
    q.extend_from_slice(&[0, 0]);
    q.extend_from_slice(&(if dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
    q.extend_from_slice(&[0, 0]);
    q
}

#[test]
fn identical_questions_in_flight_share_one_upstream_query_and_each_client_gets_its_answer() {
    let (e, cache) = engine_with(config());
    let (up, first, _) = forwarded_slot(ask_on(
        &e,
        POD,
        &query(0x0101, "www.example.com", 1),
        0,
        1,
        1.0,
    ));
    // Another endpoint, its own id, another spelling of the name: it waits for the same answer.
    let second = match ask_on(&e, FREE, &query(0x0202, "WWW.example.COM", 1), 0, 1, 1.0) {
        QueryAction::Merged { token } => token,
        other => panic!("expected a merge, got {other:?}"),
    };
    // Whatever can change the answer keeps questions apart.
    let apart = [
        query(3, "www.example.com", 28),                        // type
        with_edns(query(4, "www.example.com", 1), 1232, false), // EDNS
        with_edns(query(5, "www.example.com", 1), 1232, true),  // DO
        with_edns(query(6, "www.example.com", 1), 4096, false), // buffer size
    ];
    for q in &apart {
        forwarded(ask(&e, POD, q, 1.0).0);
    }
    forwarded_slot(ask_on(&e, POD, &query(7, "www.example.com", 1), 1, 1, 1.0)); // channel
    let (_, tcp) = forwarded(
        e.query(
            ip(FREE),
            ip(RESOLVER),
            53,
            Proto::Tcp,
            &query(8, "www.example.com", 1),
            0,
            1,
            1.0,
        )
        .expect("engine")
        .0,
    );
    assert!(tcp > 0, "TCP is another transport");
    let id = u16::from_be_bytes([up[0], up[1]]);
    let a = answer(id, "www.example.com", None, &[[192, 0, 2, 9]], 60);
    let got = e.response(0, 0, &a, 1.5).expect("engine");
    assert_eq!(got.len(), 2);
    let (one, two) = (&got[0], &got[1]);
    assert_eq!((one.token, two.token), (first, second));
    assert_eq!(
        (&one.bytes[..2], &two.bytes[..2]),
        (&[1u8, 1][..], &[2u8, 2][..])
    );
    assert_eq!(
        &two.bytes[12..29],
        &query(0x0202, "WWW.example.COM", 1)[12..29]
    );
    // Both endpoints learned the address, each held for its own firewall element.
    assert!(one.hold && two.hold);
    let learned: Vec<_> = got
        .iter()
        .flat_map(|a| a.changes.iter().map(|c| c.endpoint))
        .collect();
    assert_eq!(learned, vec![5, 9]);
    let c = cache.read().expect("lock");
    assert!(c.allowed(5, ip("192.0.2.9"), 2.0) && c.allowed(9, ip("192.0.2.9"), 2.0));
    drop(c);
    let s = e.stats().expect("stats");
    assert_eq!((s.merged, s.inflight, s.upstream_inflight), (1, 6, 6));
    // A second copy of the answer matches nothing any more.
    assert!(e.response(0, 0, &a, 1.6).expect("engine").is_empty());
}

#[test]
fn a_merged_client_that_goes_away_leaves_the_others_waiting() {
    let (e, _) = engine_with(config());
    let (up, first) = forwarded(ask(&e, POD, &query(1, "www.example.com", 1), 1.0).0);
    let QueryAction::Merged { token: second } =
        ask(&e, POD, &query(2, "www.example.com", 1), 1.0).0
    else {
        panic!("expected a merge");
    };
    assert!(e.cancel(first).expect("e"));
    let id = u16::from_be_bytes([up[0], up[1]]);
    let got = e
        .response(
            0,
            0,
            &answer(id, "www.example.com", None, &[[192, 0, 2, 1]], 9),
            1.1,
        )
        .expect("e");
    assert_eq!(
        got.iter().map(|a| a.token).collect::<Vec<_>>(),
        vec![second]
    );
    // Timeouts: every waiting client gets SERVFAIL; the upstream failure is counted once.
    forwarded(ask(&e, POD, &query(3, "a.example.com", 1), 5.0).0);
    ask(&e, FREE, &query(4, "a.example.com", 1), 5.0);
    let expired = e.sweep(8.0).expect("sweep");
    assert_eq!(expired.len(), 2);
    assert_eq!(
        expired.iter().map(|x| x.channel).collect::<Vec<_>>(),
        vec![Some(0), None]
    );
    assert!(expired.iter().all(|x| rcode(&x.bytes) == 2));
}

#[test]
fn answers_must_come_back_on_the_source_port_slot_the_query_left_from() {
    let (e, _) = engine_with(EngineConfig {
        max_inflight: 1000,
        max_inflight_per_client: 1000,
        ..config()
    });
    let mut slots = std::collections::HashSet::new();
    for i in 0..200u16 {
        let name = format!("n{i}.example.com");
        let (_, _, slot) = forwarded_slot(ask_on(&e, POD, &query(i, &name, 1), 0, 1024, 1.0));
        assert!(slot < 1024);
        slots.insert(slot);
    }
    assert!(
        slots.len() > 150,
        "slots are drawn at random: {} distinct of 200",
        slots.len()
    );
    let (up, token, slot) = forwarded_slot(ask_on(
        &e,
        POD,
        &query(9, "www.example.com", 1),
        0,
        1024,
        1.0,
    ));
    let id = u16::from_be_bytes([up[0], up[1]]);
    let a = answer(id, "www.example.com", None, &[[192, 0, 2, 1]], 9);
    let wrong = (slot + 1) % 1024;
    assert!(
        e.response(0, wrong, &a, 1.1).expect("e").is_empty(),
        "another port"
    );
    let got = e.response(0, slot, &a, 1.1).expect("e");
    assert_eq!(got[0].token, token);
}

#[test]
fn query_names_go_upstream_in_random_case_and_answers_must_repeat_it() {
    let (e, _) = engine_with(EngineConfig {
        case_randomization: true,
        ..config()
    });
    let name = "abcdefghijklmnopqrstuvwxyz.example.com";
    let q = query(0x0505, name, 1);
    let (up, token) = forwarded(ask(&e, POD, &q, 1.0).0);
    assert!(up[12..].eq_ignore_ascii_case(&q[12..]));
    assert_ne!(
        &up[12..],
        &q[12..],
        "31 letters all kept their case: 1 in 2^31"
    );
    let id = u16::from_be_bytes([up[0], up[1]]);
    // The right id and port, the name in another case: a forger who could not see the query.
    let forged = answer(id, name, None, &[[6, 6, 6, 6]], 9);
    assert!(e.response1(0, &forged, 1.1).expect("e").is_none());
    assert_eq!(e.stats().expect("s").dropped_case, 1);
    // The real upstream repeats the name as it was sent; the client gets its own spelling.
    let mut real = answer(id, name, None, &[[192, 0, 2, 1]], 9);
    let end = q.len() - 4;
    real[12..end].copy_from_slice(&up[12..end]);
    let got = e.response1(0, &real, 1.2).expect("e").expect("matched");
    assert_eq!(got.token, token);
    assert_eq!(&got.bytes[12..end], &q[12..end]);
    // TCP queries keep their case (nobody off-path can answer on a connection).
    let (tcp, _) = forwarded(
        e.query(ip(FREE), ip(RESOLVER), 53, Proto::Tcp, &q, 0, 1, 1.3)
            .expect("e")
            .0,
    );
    assert_eq!(&tcp[2..], &q[2..]);
}

#[test]
fn an_upstream_that_does_not_keep_case_turns_0x20_off_for_its_channel_only() {
    let (e, _) = engine_with(EngineConfig {
        case_randomization: true,
        ..config()
    });
    let mut dropped = 0;
    for i in 0..CASE_FALLBACK {
        let name = format!("host{i}.example.com");
        let (up, _) = forwarded(ask(&e, POD, &query(1, &name, 1), 1.0).0);
        let id = u16::from_be_bytes([up[0], up[1]]);
        // This upstream answers in lower case whatever it was asked.
        let got = e
            .response1(0, &answer(id, &name, None, &[[192, 0, 2, 1]], 9), 1.1)
            .expect("e");
        dropped += usize::from(got.is_none());
    }
    assert_eq!(
        dropped,
        CASE_FALLBACK as usize - 1,
        "the last mismatch turns it off"
    );
    let s = e.stats().expect("s");
    assert_eq!(
        (s.dropped_case, s.case_fallbacks),
        (u64::from(CASE_FALLBACK) - 1, 1)
    );
    let q = query(2, "mixed.example.com", 1);
    let (up, _) = forwarded(ask(&e, POD, &q, 2.0).0);
    assert_eq!(&up[2..], &q[2..], "channel 0 sends names as written now");
    let (up1, _, _) = forwarded_slot(ask_on(
        &e,
        POD,
        &query(3, "mixed.example.com", 1),
        1,
        1,
        2.0,
    ));
    assert!(
        up1[12..].eq_ignore_ascii_case(&q[12..]) && up1[12..] != q[12..],
        "another channel still randomises"
    );
}

#[test]
fn one_client_cannot_take_every_in_flight_slot() {
    let (e, _) = engine_with(EngineConfig {
        max_inflight: 10,
        max_inflight_per_client: 4,
        ..config()
    });
    for i in 0..4u16 {
        forwarded(ask(&e, POD, &query(i, &format!("n{i}.example.com"), 1), 1.0).0);
    }
    let refused = replied(ask(&e, POD, &query(9, "late.example.com", 1), 1.0).0);
    assert_eq!(
        rcode(&refused),
        2,
        "its own share is used up: SERVFAIL at once"
    );
    forwarded(ask(&e, FREE, &query(10, "other.org", 1), 1.0).0);
    let s = e.stats().expect("s");
    assert_eq!((s.overloaded, s.overloaded_client), (1, 1));
}

#[test]
fn when_every_slot_is_taken_the_client_holding_most_gives_one_up() {
    let (e, _) = engine_with(EngineConfig {
        max_inflight: 4,
        max_inflight_per_client: 4,
        ..config()
    });
    let mut tokens = Vec::new();
    for i in 0..4u16 {
        let (_, t) = forwarded(ask(&e, POD, &query(i, &format!("n{i}.example.com"), 1), 1.0).0);
        tokens.push(t);
    }
    // All four slots are POD's: FREE's query takes POD's oldest.
    let (_, free) = forwarded(ask(&e, FREE, &query(20, "other.org", 1), 1.5).0);
    let evicted = e.sweep(1.6).expect("sweep");
    assert_eq!(evicted.len(), 1);
    assert_eq!((evicted[0].token, evicted[0].channel), (tokens[0], None));
    assert_eq!(rcode(&evicted[0].bytes), 2);
    // FREE holds 1, POD 3: FREE's next query takes another of POD's (3 > 1 + 1) ...
    forwarded(ask(&e, FREE, &query(21, "other2.org", 1), 1.7).0);
    // ... but with 2 each, a third of FREE's would not: nobody holds more than it would.
    let refused = replied(ask(&e, FREE, &query(22, "other3.org", 1), 1.8).0);
    assert_eq!(rcode(&refused), 2);
    let s = e.stats().expect("s");
    assert_eq!((s.evicted, s.overloaded, s.inflight), (2, 1, 4));
    assert!(free > 0);
    // An evicted query's late answer is dropped.
    assert!(e.cancel(tokens[0]).is_ok_and(|gone| !gone));
}

#[test]
fn ttls_are_capped_at_max_ttl_in_the_answer_and_the_cache() {
    // (TTL from the upstream, max_ttl, TTL the client and the cache get)
    let cases = [
        (0x7fff_ffff, 86_400, 86_400),
        (0x7fff_ffff, 3_600, 3_600),
        (60, 3_600, 60),
        (3_600, 3_600, 3_600),
        (0x8000_0000, 3_600, 0),
    ];
    for (ttl, max_ttl, want) in cases {
        let (e, cache) = engine_with(EngineConfig {
            max_ttl,
            ..config()
        });
        let (up, _) = forwarded(ask(&e, POD, &query(7, "www.example.com", 1), 100.0).0);
        let upstream_id = u16::from_be_bytes([up[0], up[1]]);
        let a = answer(
            upstream_id,
            "www.example.com",
            Some("edge.example.net"),
            &[[192, 0, 2, 1]],
            ttl,
        );
        let got = e.response1(0, &a, 100.0).expect("engine").expect("matched");
        let m = wire::Message::parse(&got.bytes).expect("the client's answer parses");
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(
            ttls,
            [want, want],
            "ttl {ttl}, max_ttl {max_ttl}: CNAME and A"
        );
        let name = LabelBuf::from_presentation(b"www.example.com").expect("name");
        let held = cache.read().expect("lock").lookup(&name, Some(5));
        assert_eq!(
            held,
            [(ip("192.0.2.1"), 100.0 + f64::from(want))],
            "ttl {ttl}, max_ttl {max_ttl}: cache expiry"
        );
    }
}

#[test]
fn an_address_that_gains_a_name_is_programmed_and_held_again() {
    // It may belong in more of the firewall's sets now (toFQDNs rules that select the new name).
    let (e, _) = engine_with(config());
    for (id, name, expect_hold) in [(1u16, "a.example.com", true), (2, "b.example.com", true)] {
        let (up, _) = forwarded(ask(&e, POD, &query(id, name, 1), 1.0).0);
        let uid = u16::from_be_bytes([up[0], up[1]]);
        let got = e
            .response1(0, &answer(uid, name, None, &[[192, 0, 2, 50]], 60), 1.1)
            .expect("e")
            .expect("matched");
        assert_eq!(got.hold, expect_hold, "{name}");
        assert_eq!(
            got.changes.iter().map(|c| c.kind).collect::<Vec<_>>(),
            vec![ChangeKind::Added],
            "{name}"
        );
    }
    // The same name again: nothing new for the firewall.
    let (up, _) = forwarded(ask(&e, POD, &query(3, "b.example.com", 1), 1.2).0);
    let uid = u16::from_be_bytes([up[0], up[1]]);
    let got = e
        .response1(
            0,
            &answer(uid, "b.example.com", None, &[[192, 0, 2, 50]], 60),
            1.3,
        )
        .expect("e")
        .expect("matched");
    assert!(!got.hold && got.changes.is_empty());
}

fn retransmitting(retransmit: f64, retries: u32) -> Engine {
    engine_with(EngineConfig {
        retransmit,
        retries,
        case_randomization: true,
        ..config()
    })
    .0
}

/// A copy to send: (token, slot, bytes).
type Copy = (u64, u16, Vec<u8>);

/// The copies due at `now`, and when the next is due.
fn due(e: &Engine, now: f64) -> (Vec<Copy>, Option<f64>) {
    let (out, next) = e.retransmits(now).expect("engine");
    let out = out
        .into_iter()
        .map(|r| {
            assert_eq!((r.channel, r.started), (1, 100.0));
            (r.token, r.slot, r.bytes)
        })
        .collect();
    (out, next)
}

/// An answer to the upstream query `up` (www.example.com): its id, its question as sent (the
/// name's case, the type), then A records.
fn answer_as_sent(up: &[u8], addrs: &[[u8; 4]]) -> Vec<u8> {
    let id = u16::from_be_bytes([up[0], up[1]]);
    let mut a = answer(id, "www.example.com", None, addrs, 60);
    a[12..up.len()].copy_from_slice(&up[12..]);
    a
}

#[test]
fn an_unanswered_udp_query_is_sent_again_the_same_bytes_once_per_retry() {
    let e = retransmitting(0.5, 2);
    let (up, token, slot) = forwarded_slot(ask_on(
        &e,
        POD,
        &query(0x4242, "www.example.com", 1),
        1,
        64,
        100.0,
    ));
    assert_eq!(due(&e, 100.0), (vec![], Some(100.5)));
    assert_eq!(due(&e, 100.49), (vec![], Some(100.5)));
    // The same bytes: the upstream id and the name in the case it was sent in (0x20).
    assert_eq!(
        due(&e, 100.5),
        (vec![(token, slot, up.clone())], Some(101.0))
    );
    assert_eq!(due(&e, 100.9), (vec![], Some(101.0)));
    assert_eq!(due(&e, 101.2), (vec![(token, slot, up.clone())], None));
    assert_eq!(due(&e, 101.9), (vec![], None), "at most `retries` copies");
    assert_eq!(e.stats().expect("stats").retransmits, 2);
    // The SERVFAIL still comes at the timeout from the first send.
    assert!(e.sweep(101.99).expect("sweep").is_empty());
    let expired = e.sweep(102.0).expect("sweep");
    assert_eq!(expired.len(), 1);
    assert_eq!(rcode(&expired[0].bytes), 2);
    assert_eq!(e.stats().expect("stats").timeouts, 1);
}

#[test]
fn retransmissions_stop_before_the_timeout_whatever_the_retries() {
    let e = retransmitting(0.5, 10);
    let (up, token, slot) = forwarded_slot(ask_on(
        &e,
        POD,
        &query(1, "www.example.com", 1),
        1,
        1,
        100.0,
    ));
    let mut copies = Vec::new();
    for step in 1..=50 {
        let now = 100.0 + f64::from(step) * 0.05;
        copies.extend(due(&e, now).0.into_iter().map(|c| (now, c)));
    }
    let times: Vec<f64> = copies.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        times.len(),
        3,
        "at 0.5, 1.0 and 1.5 s, never at the 2 s timeout: {times:?}"
    );
    for ((t, c), want) in copies.iter().zip([100.5, 101.0, 101.5]) {
        assert!((t - want).abs() < 1e-6, "{t} vs {want}");
        assert_eq!(c, &(token, slot, up.clone()));
    }
    assert_eq!(e.sweep(102.0).expect("sweep").len(), 1);
}

#[test]
fn an_answered_query_is_never_sent_again_and_a_late_copy_of_the_answer_matches_nothing() {
    let e = retransmitting(0.5, 2);
    let (up, token) = forwarded(ask_on(
        &e,
        POD,
        &query(7, "www.example.com", 1),
        1,
        1,
        100.0,
    ));
    // Answered before the copy was due: no copy.
    let a = answer_as_sent(&up, &[[192, 0, 2, 1]]);
    assert_eq!(e.response(1, 0, &a, 100.3).expect("engine").len(), 1);
    assert_eq!(due(&e, 101.5), (vec![], None));
    // Sent again, then answered (either copy): one answer for the client, the other copy of
    // the answer is dropped as unmatched.
    let (up, token2) = forwarded(ask_on(
        &e,
        POD,
        &query(8, "www.example.com", 28),
        1,
        1,
        100.0,
    ));
    assert_ne!(token, token2);
    assert_eq!(due(&e, 100.5).0.len(), 1);
    let a = answer_as_sent(&up, &[]);
    let got = e.response(1, 0, &a, 100.6).expect("engine");
    assert_eq!(
        got.iter().map(|g| g.token).collect::<Vec<_>>(),
        vec![token2]
    );
    assert!(e.response(1, 0, &a, 100.7).expect("engine").is_empty());
    assert_eq!(due(&e, 101.5), (vec![], None));
    let s = e.stats().expect("stats");
    assert_eq!((s.retransmits, s.dropped_unmatched, s.timeouts), (1, 1, 0));
}

#[test]
fn merged_clients_share_one_copy_and_each_gets_one_answer() {
    let e = retransmitting(0.5, 1);
    let (up, first) = forwarded(ask_on(
        &e,
        POD,
        &query(0x0101, "www.example.com", 1),
        1,
        1,
        100.0,
    ));
    let QueryAction::Merged { token: second } =
        ask_on(&e, FREE, &query(0x0202, "WWW.example.com", 1), 1, 1, 100.2)
    else {
        panic!("expected a merge");
    };
    let copies = due(&e, 100.5).0;
    assert_eq!(copies.len(), 1, "one upstream query, one copy");
    assert_eq!((copies[0].0, &copies[0].2), (first, &up));
    let a = answer_as_sent(&up, &[[192, 0, 2, 7]]);
    let got = e.response(1, 0, &a, 100.8).expect("engine");
    assert_eq!(
        got.iter()
            .map(|g| (g.token, [g.bytes[0], g.bytes[1]]))
            .collect::<Vec<_>>(),
        vec![(first, [1, 1]), (second, [2, 2])]
    );
    assert!(e.response(1, 0, &a, 100.9).expect("engine").is_empty());
}

#[test]
fn tcp_queries_and_a_zero_interval_are_never_sent_again() {
    let e = retransmitting(0.5, 1);
    let tcp = e
        .query(
            ip(FREE),
            ip(RESOLVER),
            53,
            Proto::Tcp,
            &query(1, "www.example.com", 1),
            1,
            1,
            100.0,
        )
        .expect("engine")
        .0;
    forwarded(tcp);
    assert_eq!(due(&e, 101.9), (vec![], None));
    let off = retransmitting(0.0, 1);
    forwarded(ask_on(
        &off,
        POD,
        &query(2, "www.example.com", 1),
        1,
        1,
        100.0,
    ));
    assert_eq!(due(&off, 101.9), (vec![], None));
    assert_eq!(off.sweep(102.0).expect("sweep").len(), 1);
}

#[test]
fn the_schedule_of_queries_no_one_retransmits_is_bounded_by_the_sweep() {
    let e = retransmitting(0.5, 1);
    for i in 0..100u16 {
        forwarded(ask(&e, POD, &query(i, &format!("n{i}.example.com"), 1), 100.0).0);
    }
    assert_eq!(e.sweep(102.0).expect("sweep").len(), 100);
    let st = e.state.lock().expect("lock");
    assert!(st.retransmits.iter().all(VecDeque::is_empty));
}

#[test]
fn a_caller_that_comes_after_the_timeout_gets_no_copy() {
    // Copies due at 100.65, 101.3 and 101.95, all before the timeout at 102.
    let e = retransmitting(0.65, 3);
    let (up, token, slot) = forwarded_slot(ask_on(
        &e,
        POD,
        &query(0x4343, "www.example.com", 1),
        1,
        64,
        100.0,
    ));
    assert_eq!(due(&e, 100.66).0, vec![(token, slot, up.clone())]);
    assert_eq!(due(&e, 101.31).0, vec![(token, slot, up)]);
    // The third was due before the timeout, but the caller (a sweeper's tick) comes after
    // it: a copy sent now could not be answered in time.
    assert_eq!(due(&e, 102.02), (vec![], None));
    assert_eq!(e.stats().expect("stats").retransmits, 2);
}

#[test]
fn retransmission_settings_out_of_bounds_are_refused() {
    let make = |retransmit: f64, retries: u32| {
        let cache = Arc::new(RwLock::new(Cache::new(
            Config::new(0, 1000, 100_000).expect("config"),
        )));
        let config = EngineConfig {
            retransmit,
            retries,
            ..config()
        };
        Engine::new(config, cache, table(None)).map(|_| ())
    };
    assert!(make(0.5, MAX_RETRIES).is_ok());
    assert!(make(0.0, 0).is_ok());
    let many = make(0.5, MAX_RETRIES + 1).expect_err("too many copies");
    assert!(many.0.contains("retries"), "{many}");
    let soon = make(RETRANSMIT_FLOOR / 2.0, 1).expect_err("below the floor");
    assert!(soon.0.contains("retransmit"), "{soon}");
    assert!(make(f64::NAN, 1).is_err());
}
