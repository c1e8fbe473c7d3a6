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
        vec![ch(Added, 1, "9.9.9.9", 100.0)],
        "a new name for the address: programmed as new (it may belong in more sets), with the \
         expiry it has"
    );
    assert_eq!(
        rec(&mut c, 1, "b.com", &[("9.9.9.9", 50)], 0.0),
        vec![],
        "the same name again, an earlier expiry: the firewall needs nothing"
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
        // Added again: the pair gained a name. It carries the pair's expiry now, which can be
        // below the replayed one only after an eviction (see the loop's comment).
        Added => {
            let e = m.entry(key).or_insert(c.expires_at);
            *e = e.max(c.expires_at);
        }
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

/// The snapshot encoder as it was before snapshots were streamed (the whole file built in
/// memory under one hold of the lock): the reference the streamed files must stay compatible
/// with. Names are numbered by first appearance in eviction order.
fn encode_in_one_piece(cache: &Cache) -> Vec<u8> {
    let entries = cache.entries_ordered();
    let cfg = cache.config();
    let stats = cache.stats();
    let mut ids: std::collections::HashMap<&[u8], u32> = std::collections::HashMap::new();
    let mut list: Vec<&[u8]> = Vec::new();
    for &(_, wire, _, _) in &entries {
        ids.entry(wire).or_insert_with(|| {
            list.push(wire);
            (list.len() - 1) as u32
        });
    }
    let mut out = b"FQDNGCS\0".to_vec();
    for v in [1, cfg.min_ttl, cfg.max_ips_per_name, cfg.max_entries] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&stats.evictions.to_le_bytes());
    out.extend_from_slice(&stats.name_evictions.to_le_bytes());
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for n in &list {
        out.push(n.len() as u8);
        out.extend_from_slice(n);
    }
    for &(ep, wire, ip, expires) in &entries {
        out.extend_from_slice(&ep.to_le_bytes());
        out.extend_from_slice(&ids[wire].to_le_bytes());
        match ip {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&expires.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// (endpoint, wire name, ip, expiry) as a snapshot file holds an entry.
type SavedEntry = (u32, Vec<u8>, IpAddr, f64);

/// (endpoint, wire name, ip, expiry) of every entry of a snapshot, in file order, and the
/// number of names it lists.
fn snapshot_entries(bytes: &[u8]) -> (Vec<SavedEntry>, usize) {
    let u32_at = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().expect("4 bytes"));
    let (names, entries) = (u32_at(40) as usize, u32_at(44) as usize);
    let mut p = 48;
    let mut list = Vec::new();
    for _ in 0..names {
        let n = bytes[p] as usize;
        list.push(bytes[p + 1..p + 1 + n].to_vec());
        p += 1 + n;
    }
    let mut out = Vec::new();
    for _ in 0..entries {
        let (ep, name) = (u32_at(p), u32_at(p + 4) as usize);
        let (ip, len) = if bytes[p + 8] == 4 {
            let a: [u8; 4] = bytes[p + 9..p + 13].try_into().expect("4 bytes");
            (IpAddr::from(a), 4)
        } else {
            let a: [u8; 16] = bytes[p + 9..p + 25].try_into().expect("16 bytes");
            (IpAddr::from(a), 16)
        };
        let at = p + 9 + len;
        let expires = f64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        out.push((ep, list[name].clone(), ip, expires));
        p = at + 8;
    }
    assert_eq!(p + 4, bytes.len(), "the checksum ends the file");
    (out, names)
}

#[test]
fn streamed_snapshot_is_the_one_piece_format() {
    // Names shared between endpoints, IPv4 and IPv6 interleaved in expiry order, equal
    // expiries (ordered by stamp), evictions counted, an escaped name.
    let mut c = cache(5, 3, 40);
    for i in 0..30u32 {
        let n = format!("n{}.example.com", i % 7);
        let v6 = format!("2001:db8::{i:x}");
        let v4 = format!("192.0.2.{i}");
        rec(
            &mut c,
            i % 3,
            &n,
            &[(&v4, 10 + i % 5), (&v6, 12)],
            f64::from(i),
        );
    }
    rec(&mut c, 9, "we\\\"ird\\.name.com", &[("10.0.0.1", 99)], 0.0);
    assert!(c.stats().evictions > 0);
    let streamed = snapshot::encode(&c);
    let reference = encode_in_one_piece(&c);
    assert_eq!(streamed.len(), reference.len());
    assert_eq!(
        streamed[..40],
        reference[..40],
        "magic, version, limits, counters"
    );
    assert_eq!(streamed[40..48], reference[40..48], "name and entry counts");
    let (got, names) = snapshot_entries(&streamed);
    let (want, want_names) = snapshot_entries(&reference);
    assert_eq!(got, want, "the same entries in the same order");
    assert_eq!(names, want_names, "each name once");
    assert_eq!(names, c.stats().names);
    let back = snapshot::decode(&streamed, 0.0).expect("loads");
    back.check();
    assert_eq!(back.entries(), c.entries());
}

/// What a [`Meddler`] does to the cache before chunk `k`.
type Meddle<'a> = dyn FnMut(&mut Cache, usize) + 'a;

/// A source that, before every chunk but the first, changes the cache: it needs the write lock,
/// which it takes with `try_write`, so the test fails if a chunk kept the lock.
struct Meddler<'a> {
    lock: &'a std::sync::RwLock<Cache>,
    chunks: std::cell::Cell<usize>,
    meddle: std::cell::RefCell<Box<Meddle<'a>>>,
}

impl snapshot::Source for &Meddler<'_> {
    fn with<R>(&self, f: impl FnOnce(&Cache) -> R) -> Result<R, CacheError> {
        let k = self.chunks.get();
        self.chunks.set(k + 1);
        if k > 0 {
            let mut c = self
                .lock
                .try_write()
                .expect("no lock is held between chunks");
            (self.meddle.borrow_mut())(&mut c, k);
        }
        let c = self.lock.read().expect("lock");
        Ok(f(&c))
    }
}

#[test]
fn snapshot_taken_while_the_cache_changes_keeps_what_lived_through_it() {
    let mut c = cache(0, 1000, 1_000_000);
    let stable = 3000u32;
    for i in 0..stable {
        let ip = if i % 4 == 0 {
            format!("2001:db8::{i:x}")
        } else {
            format!("10.0.{}.{}", i / 256, i % 256)
        };
        rec(
            &mut c,
            1,
            &format!("s{i}.example.com"),
            &[(&ip, 1000 + i % 50)],
            0.0,
        );
    }
    // Long names that go away during the save: enough garbage to compact the name arena,
    // which renumbers the name keys the snapshot dedupes names by.
    let long = "x".repeat(55);
    for i in 0..2000u32 {
        let ip = format!("10.9.{}.{}", i / 256, i % 256);
        rec(
            &mut c,
            2,
            &format!("{long}{i}.doomed.org"),
            &[(&ip, 5)],
            0.0,
        );
    }
    let compactions = c.name_key_epoch();
    let lock = std::sync::RwLock::new(c);
    let meddler = Meddler {
        lock: &lock,
        chunks: std::cell::Cell::new(0),
        meddle: std::cell::RefCell::new(Box::new(|c: &mut Cache, k: usize| {
            if k == 2 {
                c.expire(6.0).expect("expire"); // every doomed entry
            }
            // New entries and extensions of stable ones, between every chunk.
            let ip = format!("10.8.{}.{}", k / 256, k % 256);
            let n = name(&format!("new{k}.example.net"));
            c.record(3, &n, &[(ip.parse().expect("ip"), 2000)], 0.0)
                .expect("recorded");
            let s = name(&format!("s{}.example.com", k * 7 % 3000));
            let addrs: Vec<(IpAddr, u32)> = c
                .lookup(&s, Some(1))
                .iter()
                .map(|&(a, _)| (a, 5000))
                .collect();
            c.record(1, &s, &addrs, 0.0).expect("recorded");
        })),
    };
    let bytes = snapshot::write_to(&meddler, std::io::Cursor::new(Vec::new()))
        .expect("written")
        .into_inner();
    let chunks = meddler.chunks.get();
    drop(meddler);
    assert!(chunks > 3000 / snapshot::CHUNK, "read in {chunks} chunks");
    let c = lock.into_inner().expect("lock");
    assert!(
        c.name_key_epoch() > compactions,
        "the names were compacted during the save"
    );
    let back = snapshot::decode(&bytes, 0.0).expect("a valid snapshot");
    back.check();
    // Every stable entry, exactly once, under its own name, with its expiry then or now.
    let (entries, _) = snapshot_entries(&bytes);
    let mut seen = std::collections::HashMap::new();
    for (ep, wire, ip, expires) in &entries {
        if *ep == 1 {
            *seen.entry((names::display(wire), *ip)).or_insert(0) += 1;
            assert!(*expires >= 1000.0, "{expires}");
        }
    }
    assert_eq!(seen.len(), stable as usize);
    assert!(seen.values().all(|&n| n == 1), "each stable entry once");
    for i in 0..stable {
        let n = name(&format!("s{i}.example.com"));
        let now_held = c.lookup(&n, Some(1));
        let saved = back.lookup(&n, Some(1));
        assert_eq!(saved.len(), 1, "s{i}");
        assert_eq!(saved[0].0, now_held[0].0, "s{i}: same address");
        assert!(
            saved[0].1 <= now_held[0].1,
            "s{i}: never later than the cache"
        );
    }
}

#[test]
fn listing_pieces_cover_every_entry_once_and_filter() {
    let mut c = cache(0, 1000, 1_000_000);
    for i in 0..2000u32 {
        let ip = format!("10.0.{}.{}", i / 256, i % 256);
        rec(
            &mut c,
            i % 4,
            &format!("h{}.example.com", i % 500),
            &[(&ip, 60)],
            100.0,
        );
    }
    rec(
        &mut c,
        7,
        "we\\\"ird\\\\.example.com",
        &[("2001:db8::1", 30)],
        100.0,
    );
    let lock = std::sync::RwLock::new(c);
    let all = |filter: &listing::Filter, budget: usize| {
        let (mut out, mut cursor, mut calls) = (Vec::new(), Some(0), 0);
        while let Some(at) = cursor {
            cursor = listing::list(&lock, at, filter, budget, &mut out).expect("listed");
            calls += 1;
        }
        (String::from_utf8(out).expect("utf-8"), calls)
    };
    let (text, calls) = all(&listing::Filter::default(), 300);
    assert!(calls >= 2001 / 300, "{calls} pieces");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2001);
    let unique: std::collections::HashSet<&str> = lines.iter().copied().collect();
    assert_eq!(unique.len(), 2001, "each entry once");
    assert!(lines.contains(
        &r#"{"endpoint":7,"name":"we\"ird\\\\.example.com.","ip":"2001:db8::1","expires_at":130.000}"#
    ), "JSON escapes of the presentation form");
    assert!(lines.contains(
        &r#"{"endpoint":1,"name":"h1.example.com.","ip":"10.0.0.1","expires_at":160.000}"#
    ));
    let one = listing::Filter {
        endpoint: Some(1),
        name: Some({
            let mut w = Vec::new();
            names::wire_from_presentation(b"H1.example.com.", &mut w).expect("name");
            w
        }),
    };
    let (text, _) = all(&one, 300);
    assert_eq!(text.lines().count(), 4, "{text}"); // h1 for i = 1, 501, 1001, 1501
    let (text, _) = all(
        &listing::Filter {
            endpoint: Some(7),
            name: None,
        },
        10,
    );
    assert_eq!(text.lines().count(), 1);
}

#[test]
fn forget_removes_one_endpoint_and_nothing_else() {
    let mut c = cache(0, 1000, 100);
    rec(&mut c, 1, "a.com", &[("1.1.1.1", 60), ("1.1.1.2", 30)], 0.0);
    rec(&mut c, 1, "b.com", &[("1.1.1.1", 90)], 0.0);
    rec(&mut c, 2, "a.com", &[("1.1.1.1", 60)], 0.0);
    let mut got = c.forget(1);
    c.check();
    got.sort_by_key(|x| x.ip);
    assert_eq!(
        got,
        vec![
            ch(Removed, 1, "1.1.1.1", 90.0),
            ch(Removed, 1, "1.1.1.2", 30.0)
        ]
    );
    assert!(!c.allowed(1, ip("1.1.1.1"), 1.0));
    assert!(
        c.allowed(2, ip("1.1.1.1"), 1.0),
        "another endpoint keeps its entries"
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c.stats().endpoints, 1);
    assert_eq!(c.forget(1), vec![], "a second forget finds nothing");
    assert_eq!(c.forget(7), vec![], "an endpoint never seen");
}
