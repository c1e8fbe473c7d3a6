//! Criterion: DNS verdicts for one identity selected by 4 policies x 10 rules x 10 `rules.dns`
//! patterns (the shape of `benches/test_bench_policy.py`), against a bare trie of the same 400
//! patterns.

use std::hint::black_box;
use std::net::IpAddr;

use _core::pattern::{parse_match_pattern, LabelBuf, PatternTrie};
use _core::policy::{EgressRule, NameSel, Peers, PolicySet, PortEntry, PortRange, Proto, Spec};
use criterion::{criterion_group, criterion_main, Criterion};

const POLICIES: u32 = 4;
const RULES: u32 = 10;
const PATTERNS: u32 = 10;

fn patterns(i: u32, r: u32) -> Vec<String> {
    (0..PATTERNS)
        .map(|k| match k % 4 {
            0 => format!("api{i}-{r}-{k}.svc{k}.example.com"),
            1 => format!("*.cdn{i}-{r}-{k}.example.net"),
            2 => format!("**.t{i}-{r}-{k}.cloud.io"),
            _ => format!("api-*-p{i}-{r}-{k}.example.org"),
        })
        .collect()
}

fn kube_dns() -> IpAddr {
    IpAddr::from([10, 96, 0, 10])
}

fn policy_set() -> PolicySet {
    let specs = (0..POLICIES)
        .map(|i| Spec {
            policy: format!("default/p{i}"),
            label: format!("CiliumNetworkPolicy default/p{i}"),
            default_deny: true,
            egress: (0..RULES)
                .map(|r| EgressRule {
                    index: r,
                    fqdns: vec![],
                    peers: Peers::Listed {
                        ips: [kube_dns()].into_iter().collect(),
                        ips_label: "toEndpoints".into(),
                        cidrs: vec![],
                    },
                    ports: vec![PortEntry {
                        ranges: vec![PortRange::new(53, 0, Proto::Any)],
                        dns: Some(
                            patterns(i, r)
                                .into_iter()
                                .map(|text| NameSel {
                                    parsed: parse_match_pattern(&text).expect("valid"),
                                    is_pattern: true,
                                    text,
                                })
                                .collect(),
                        ),
                    }],
                })
                .collect(),
        })
        .collect();
    PolicySet::new(specs).expect("valid")
}

fn verdicts(c: &mut Criterion) {
    let set = policy_set();
    let id = set.identity(&[0, 1, 2, 3]).expect("identity");
    let mut trie = PatternTrie::new();
    for (n, p) in (0..POLICIES)
        .flat_map(|i| (0..RULES).flat_map(move |r| patterns(i, r)))
        .enumerate()
    {
        trie.insert(&parse_match_pattern(&p).expect("valid"), n as u32);
    }
    let name = |s: &str| LabelBuf::from_presentation(s.as_bytes()).expect("valid");
    let hit = name("x.cdn1-3-1.example.net");
    let miss = name("x.other7.example.net");
    let server = kube_dns();
    assert!(set.dns_allowed(id, server, 53, Proto::Udp, &hit));
    assert!(!set.dns_allowed(id, server, 53, Proto::Udp, &miss));
    let mut g = c.benchmark_group("dns_verdict");
    for (label, n) in [("hit", &hit), ("miss", &miss)] {
        g.bench_function(format!("trie_matches/{label}"), |b| {
            b.iter(|| trie.matches(black_box(n)))
        });
        g.bench_function(format!("dns_allowed/{label}"), |b| {
            b.iter(|| set.dns_allowed(black_box(id), server, 53, Proto::Udp, black_box(n)))
        });
        g.bench_function(format!("dns_outcome/{label}"), |b| {
            b.iter(|| set.dns_outcome(black_box(Some(id)), Some(server), 53, Proto::Udp, n))
        });
        g.bench_function(format!("dns_verdict/{label}"), |b| {
            b.iter(|| set.dns_verdict(black_box(Some(id)), Some(server), 53, Proto::Udp, n))
        });
    }
    g.finish();
}

criterion_group!(benches, verdicts);
criterion_main!(benches);
