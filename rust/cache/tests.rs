//! Unit tests of the cache: one per rule, then invariants under a long random sequence.

use std::net::IpAddr;

use super::*;
use crate::pattern::LabelBuf;

fn name(s: &str) -> LabelBuf {
    LabelBuf::from_presentation(s.as_bytes()).expect("valid name")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid ip")
}

fn cache(min_ttl: u64, per_name: u64, max: u64) -> Cache {
    Cache::new(Config::new(min_ttl, per_name, max).expect("valid config"))
}

fn rec(c: &mut Cache, ep: u32, n: &str, addrs: &[(&str, u32)], now: f64) -> Vec<Change> {
    let addrs: Vec<(IpAddr, u32)> = addrs.iter().map(|&(a, t)| (ip(a), t)).collect();
    let out = c.record(ep, &name(n), &addrs, now).expect("recorded");
    c.check();
    out
}

fn ch(kind: ChangeKind, ep: u32, a: &str, expires_at: f64) -> Change {
    Change {
        kind,
        endpoint: ep,
        ip: ip(a),
        expires_at,
    }
}

use ChangeKind::{Added, Extended, Removed};

#[test]
fn record_expiry_is_now_plus_max_ttl_min_ttl() {
    let mut c = cache(30, 1000, 100);
    let got = rec(
        &mut c,
        1,
        "a.example.com",
        &[("1.2.3.4", 10), ("1.2.3.5", 60)],
        100.0,
    );
    assert_eq!(
        got,
        vec![
            ch(Added, 1, "1.2.3.4", 130.0),
            ch(Added, 1, "1.2.3.5", 160.0)
        ]
    );
    assert_eq!(c.len(), 2);
    assert!(c.allowed(1, ip("1.2.3.4"), 129.9));
    assert!(!c.allowed(1, ip("1.2.3.4"), 130.0), "expired at expires_at");
    assert!(!c.allowed(2, ip("1.2.3.4"), 100.0), "other endpoint");
}

#[test]
fn later_lookup_extends_never_shortens() {
    let mut c = cache(0, 1000, 100);
    rec(&mut c, 1, "a.com", &[("1.1.1.1", 60)], 0.0);
    assert_eq!(rec(&mut c, 1, "a.com", &[("1.1.1.1", 10)], 10.0), vec![]);
    assert_eq!(c.pair_expiry(1, ip("1.1.1.1")), Some(60.0));
    assert_eq!(
        rec(&mut c, 1, "a.com", &[("1.1.1.1", 60)], 10.0),
        vec![ch(Extended, 1, "1.1.1.1", 70.0)]
    );
    assert_eq!(c.len(), 1);
}

#[test]
fn names_are_normalised() {
    let mut c = cache(0, 1000, 100);
    rec(&mut c, 1, "API.Example.COM", &[("1.1.1.1", 60)], 0.0);
    assert_eq!(
        rec(&mut c, 1, "api.example.com.", &[("1.1.1.1", 60)], 0.0),
        vec![]
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c.names_for(ip("1.1.1.1"), None), vec!["api.example.com."]);
    assert_eq!(
        c.lookup(&name("api.EXAMPLE.com"), Some(1)),
        vec![(ip("1.1.1.1"), 60.0)]
    );
    // A dot inside a label is a different name from the two-label one.
    rec(&mut c, 1, "a\\.b.com", &[("1.1.1.2", 60)], 0.0);
    rec(&mut c, 1, "a.b.com", &[("1.1.1.2", 60)], 0.0);
    assert_eq!(
        c.names_for(ip("1.1.1.2"), Some(1)),
        vec!["a.b.com.", "a\\.b.com."]
    );
}

#[test]
fn ipv4_and_ipv6() {
    let mut c = cache(0, 1000, 100);
    let got = rec(
        &mut c,
        7,
        "dual.com",
        &[("2001:db8::1", 60), ("192.0.2.1", 60)],
        0.0,
    );
    assert_eq!(
        got,
        vec![
            ch(Added, 7, "2001:db8::1", 60.0),
            ch(Added, 7, "192.0.2.1", 60.0)
        ]
    );
    assert_eq!(
        c.lookup(&name("dual.com"), None),
        vec![(ip("192.0.2.1"), 60.0), (ip("2001:db8::1"), 60.0)],
        "sorted, IPv4 first"
    );
    assert!(c.allowed(7, ip("2001:DB8:0::1"), 1.0));
}

#[test]
fn one_ip_under_two_names_stays_until_the_later_expiry() {
    let mut c = cache(0, 1000, 100);
    rec(&mut c, 1, "a.com", &[("9.9.9.9", 100)], 0.0);
    assert_eq!(
        rec(&mut c, 1, "b.com", &[("9.9.9.9", 50)], 0.0),
        vec![],
        "earlier expiry: the firewall needs nothing"
    );
    assert_eq!(
        rec(&mut c, 1, "b.com", &[("9.9.9.9", 200)], 0.0),
        vec![ch(Extended, 1, "9.9.9.9", 200.0)]
    );
    assert_eq!(
        c.names_for(ip("9.9.9.9"), Some(1)),
        vec!["a.com.", "b.com."]
    );
    assert_eq!(c.expire(100.0).expect("ok"), vec![], "b.com still holds it");
    c.check();
    assert_eq!(c.names_for(ip("9.9.9.9"), None), vec!["b.com."]);
    assert!(c.allowed(1, ip("9.9.9.9"), 150.0));
    assert_eq!(
        c.expire(200.0).expect("ok"),
        vec![ch(Removed, 1, "9.9.9.9", 200.0)]
    );
    assert!(c.is_empty());
    assert_eq!(c.stats().names, 0, "names freed with their last entry");
    assert_eq!(c.stats().endpoints, 0);
}

#[test]
fn per_name_cap_evicts_soonest_expiring() {
    let mut c = cache(0, 3, 100);
    rec(
        &mut c,
        1,
        "s3.com",
        &[("10.0.0.1", 30), ("10.0.0.2", 10), ("10.0.0.3", 20)],
        0.0,
    );
    let got = rec(&mut c, 1, "s3.com", &[("10.0.0.4", 40)], 0.0);
    assert_eq!(
        got,
        vec![
            ch(Added, 1, "10.0.0.4", 40.0),
            ch(Removed, 1, "10.0.0.2", 10.0)
        ]
    );
    assert_eq!(c.stats().name_evictions, 1);
    assert_eq!(c.stats().evictions, 0);
    // The new IP is itself the soonest: it comes and goes within the call, so nothing to do.
    assert_eq!(rec(&mut c, 1, "s3.com", &[("10.0.0.5", 1)], 0.0), vec![]);
    assert_eq!(c.len(), 3);
    // The cap is per (endpoint, name): another endpoint has its own.
    rec(&mut c, 2, "s3.com", &[("10.0.0.5", 1)], 0.0);
    assert_eq!(c.len(), 4);
}

#[test]
fn global_cap_evicts_soonest_then_oldest_and_counts() {
    let mut c = cache(0, 1000, 3);
    rec(&mut c, 1, "a.com", &[("1.0.0.1", 50)], 0.0);
    rec(&mut c, 1, "b.com", &[("1.0.0.2", 20)], 0.0);
    rec(&mut c, 2, "c.com", &[("1.0.0.3", 20)], 0.0);
    let got = rec(&mut c, 1, "d.com", &[("1.0.0.4", 90)], 0.0);
    assert_eq!(
        got,
        vec![
            ch(Added, 1, "1.0.0.4", 90.0),
            ch(Removed, 1, "1.0.0.2", 20.0)
        ],
        "equal expiries: the one set first goes first"
    );
    assert_eq!(c.stats().evictions, 1);
    assert_eq!(c.len(), 3);
    assert!(!c.allowed(1, ip("1.0.0.2"), 0.0));
}

#[test]
fn expire_removes_only_what_is_due() {
    let mut c = cache(0, 1000, 100);
    rec(&mut c, 1, "a.com", &[("1.0.0.1", 10), ("1.0.0.2", 20)], 0.0);
    rec(&mut c, 2, "a.com", &[("1.0.0.1", 30)], 0.0);
    assert_eq!(c.expire(9.9).expect("ok"), vec![]);
    assert_eq!(
        c.expire(10.0).expect("ok"),
        vec![ch(Removed, 1, "1.0.0.1", 10.0)]
    );
    assert_eq!(
        c.expire(100.0).expect("ok"),
        vec![
            ch(Removed, 1, "1.0.0.2", 20.0),
            ch(Removed, 2, "1.0.0.1", 30.0)
        ]
    );
    c.check();
    assert!(c.is_empty());
}

#[test]
fn heap_stays_one_item_per_entry_under_extensions() {
    let mut c = cache(0, 1000, 100);
    for i in 0..100_000u32 {
        rec_quiet(&mut c, 1, "a.com", "1.1.1.1", 60, f64::from(i));
    }
    assert!(c.memory() < 1024 * 1024, "{}", c.memory());
    c.check();
}

fn rec_quiet(c: &mut Cache, ep: u32, n: &str, a: &str, ttl: u32, now: f64) -> Vec<Change> {
    c.record(ep, &name(n), &[(ip(a), ttl)], now)
        .expect("recorded")
}

#[test]
fn stamps_renumber_when_the_counter_wraps() {
    let mut c = cache(0, 1000, 4);
    rec(&mut c, 1, "a.com", &[("1.0.0.1", 10), ("1.0.0.2", 10)], 0.0);
    c.set_next_stamp(u32::MAX - 1);
    rec(
        &mut c,
        1,
        "b.com",
        &[("1.0.0.3", 10), ("1.0.0.4", 10), ("1.0.0.5", 5)],
        0.0,
    );
    // 1.0.0.5 (expiry 5) is the soonest; 1.0.0.1 (expiry 10, set first) is next.
    let got = rec(&mut c, 1, "c.com", &[("1.0.0.6", 50)], 0.0);
    assert_eq!(
        got,
        vec![
            ch(Added, 1, "1.0.0.6", 50.0),
            ch(Removed, 1, "1.0.0.1", 10.0)
        ]
    );
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    assert!(Config::new(0, 0, 10).is_err());
    assert!(Config::new(0, 10, 0).is_err());
    assert!(Config::new(1 << 33, 10, 10).is_err());
    let mut c = cache(0, 1000, 100);
    assert!(c
        .record(1, &name("a.com"), &[(ip("1.1.1.1"), 5)], f64::NAN)
        .is_err());
    assert!(c.expire(f64::INFINITY).is_err());
    assert_eq!(c.len(), 0);
    assert!(parse_ip("1.2.3").is_err());
    assert!(check_ttl(ip("1.1.1.1"), -1).is_err());
    assert!(check_ttl(ip("1.1.1.1"), 1 << 32).is_err());
    assert_eq!(check_ttl(ip("1.1.1.1"), (1 << 32) - 1), Ok(u32::MAX));
}

#[test]
fn batch_reports_the_net_change() {
    let mut c = cache(0, 1000, 100);
    let mut b = Batch::default();
    b.push(&name("a.com"), &[(ip("1.1.1.1"), 10)]);
    b.push(&name("b.com"), &[(ip("1.1.1.1"), 20), (ip("1.1.1.2"), 5)]);
    b.push(&name("c.com"), &[]);
    assert_eq!(b.len(), 3);
    let got = c.record_batch(3, &b, 0.0).expect("ok");
    assert_eq!(
        got,
        vec![ch(Added, 3, "1.1.1.1", 20.0), ch(Added, 3, "1.1.1.2", 5.0)]
    );
    assert_eq!(c.lookup(&name("c.com"), None), vec![]);
    assert_eq!(
        c.stats().names,
        2,
        "an answer with no addresses stores nothing"
    );
    c.check();
}

#[test]
fn snapshot_round_trip_drops_expired() {
    let mut c = cache(5, 7, 100);
    rec(
        &mut c,
        1,
        "a.com",
        &[("1.1.1.1", 10), ("2001:db8::1", 100)],
        0.0,
    );
    rec(&mut c, 2, "weird\\000\\.name.com", &[("1.1.1.2", 50)], 0.0);
    let bytes = snapshot::encode(&c);
    let d = snapshot::decode(&bytes, 20.0).expect("loads");
    d.check();
    assert_eq!(d.config(), c.config());
    assert_eq!(d.len(), 2);
    assert_eq!(
        d.lookup(&name("a.com"), None),
        vec![(ip("2001:db8::1"), 100.0)]
    );
    assert_eq!(
        d.names_for(ip("1.1.1.2"), None),
        vec!["weird\\000\\.name.com."]
    );
    assert_eq!(snapshot::decode(&bytes, 0.0).expect("loads").len(), 3);
}

#[test]
fn snapshot_corruption_is_detected() {
    let mut c = cache(0, 1000, 100);
    rec(&mut c, 1, "a.com", &[("1.1.1.1", 10)], 0.0);
    let good = snapshot::encode(&c);
    for cut in 0..good.len() {
        let e = snapshot::decode(&good[..cut], 0.0).expect_err("truncated");
        assert!(
            e.contains("truncated") || e.contains("magic"),
            "cut {cut}: {e}"
        );
    }
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        assert!(snapshot::decode(&bad, 0.0).is_err(), "flip at {i}");
    }
    let mut v2 = good.clone();
    v2[8] = 2;
    let e = snapshot::decode(&v2, 0.0).expect_err("version");
    assert!(e.contains("version 2"), "{e}");
}

/// A long random sequence (a fixed xorshift seed) with every invariant checked as it goes.
#[test]
fn invariants_under_random_operations() {
    let mut c = cache(3, 4, 40);
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % n
    };
    let mut now = 0.0;
    let mut allowed: std::collections::HashMap<(u32, IpAddr), f64> = Default::default();
    for step in 0..20_000 {
        if next(10) == 0 {
            now += next(20) as f64;
            for chg in c.expire(now).expect("ok") {
                apply(&mut allowed, chg);
            }
        } else {
            let ep = next(3) as u32;
            let n = format!("n{}.com", next(12));
            let k = next(4) as usize;
            let addrs: Vec<(IpAddr, u32)> = (0..k)
                .map(|_| {
                    let a: IpAddr = if next(2) == 0 {
                        format!("10.0.0.{}", next(8)).parse().expect("ip")
                    } else {
                        format!("2001:db8::{}", next(8)).parse().expect("ip")
                    };
                    (a, next(30) as u32)
                })
                .collect();
            for chg in c.record(ep, &name(&n), &addrs, now).expect("ok") {
                apply(&mut allowed, chg);
            }
        }
        if step % 97 == 0 {
            c.check();
        }
        // Replaying the change stream gives exactly the cache's pairs (expiry may be later
        // than the cache's only after an eviction dropped the name holding the latest one).
        let pairs = c.stats().pairs;
        assert_eq!(allowed.len(), pairs, "step {step}");
        for (&(ep, a), &exp) in &allowed {
            let got = c.pair_expiry(ep, a).expect("pair present");
            assert!(got <= exp, "step {step}");
        }
    }
    c.check();
}

fn apply(m: &mut std::collections::HashMap<(u32, IpAddr), f64>, c: Change) {
    let key = (c.endpoint, c.ip);
    match c.kind {
        Added => assert!(m.insert(key, c.expires_at).is_none(), "added twice: {c:?}"),
        Extended => {
            let old = m
                .insert(key, c.expires_at)
                .expect("extended an absent pair");
            assert!(old < c.expires_at || c.expires_at > 0.0);
        }
        Removed => assert!(m.remove(&key).is_some(), "removed an absent pair: {c:?}"),
    }
}

#[test]
fn memory_stays_put_under_a_flood_of_unique_names() {
    // 31k entries fill each index to about half its buckets, as 1M does. The indexes must not
    // grow under the churn, and the name arena must stay within 8/7 of the live bytes.
    let n = 31_000u32;
    let mut c = Cache::new(Config::new(0, 1000, u64::from(n)).expect("ok"));
    let mut k = 0u32;
    let mut first = None;
    for _round in 0..6 {
        for _ in 0..n / 500 {
            let mut b = Batch::with_capacity(500);
            for _ in 0..500 {
                let nm = name(&format!("host{k}.svc{}.example.com", k % 100));
                b.push(&nm, &[(IpAddr::from(k.to_be_bytes()), 60 + k % 300)]);
                k += 1;
            }
            c.record_batch(1, &b, 1000.0).expect("ok");
        }
        let (indexes, arena, live) = c.footprint();
        let (first_indexes, _) = *first.get_or_insert((indexes, arena));
        assert_eq!(indexes, first_indexes, "indexes neither grow nor shrink");
        assert!(
            arena <= live + live / 7 + 64 * 1024,
            "arena {arena} for {live} live bytes"
        );
        assert_eq!(c.len(), n as usize);
    }
    c.check();
}

#[test]
fn a_pair_freed_and_made_again_in_one_call_reports_its_net_change_once() {
    let batch = |answers: &[(&str, &str, u32)]| {
        let mut b = Batch::with_capacity(answers.len());
        for &(n, a, ttl) in answers {
            b.push(&name(n), &[(ip(a), ttl)]);
        }
        b
    };
    // One entry at most: each answer evicts the one before.
    let mut c = cache(0, 10, 1);
    let b = batch(&[
        ("a.com", "1.1.1.1", 10),
        ("b.com", "2.2.2.2", 20),
        ("c.com", "1.1.1.1", 30),
    ]);
    let got = c.record_batch(1, &b, 0.0).expect("ok");
    c.check();
    assert_eq!(got, vec![ch(Added, 1, "1.1.1.1", 30.0)]);
    // Held before the call, evicted, then made again with a later expiry: one `extended`, in
    // the place of its first touch; 2.2.2.2 came and went.
    let b = batch(&[
        ("d.com", "2.2.2.2", 40),
        ("e.com", "3.3.3.3", 50),
        ("f.com", "1.1.1.1", 60),
    ]);
    let got = c.record_batch(1, &b, 0.0).expect("ok");
    c.check();
    assert_eq!(got, vec![ch(Extended, 1, "1.1.1.1", 60.0)]);
    // A new entry that expires first is the one evicted: nothing to report.
    let got = c
        .record_batch(1, &batch(&[("g.com", "4.4.4.4", 1)]), 0.0)
        .expect("ok");
    assert_eq!(got, vec![]);
    // Evicted for good: removed, with the expiry it had.
    let got = c
        .record_batch(1, &batch(&[("g.com", "4.4.4.4", 100)]), 0.0)
        .expect("ok");
    c.check();
    assert_eq!(
        got,
        vec![
            ch(Added, 1, "4.4.4.4", 100.0),
            ch(Removed, 1, "1.1.1.1", 60.0)
        ]
    );
}
