//! Table-driven tests of the verdicts over hand-built specs.

use std::net::IpAddr;

use super::*;
use crate::pattern::{parse_match_name, parse_match_pattern, LabelBuf};

/// identity, server, port, protocol, name, expected kind.
type DnsCase<'a> = (Option<u32>, Option<IpAddr>, u16, Proto, &'a str, &'a str);
/// destination, port, cached names, expected kind.
type EgressCase<'a> = (&'a str, u16, &'a [(LabelBuf, String)], &'a str);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn pat(text: &str) -> NameSel {
    NameSel {
        parsed: parse_match_pattern(text).expect("valid pattern"),
        is_pattern: true,
        text: text.into(),
    }
}

fn exact(text: &str) -> NameSel {
    NameSel {
        parsed: parse_match_name(text).expect("valid name"),
        is_pattern: false,
        text: text.into(),
    }
}

fn name(s: &str) -> LabelBuf {
    LabelBuf::from_presentation(s.as_bytes()).expect("valid name")
}

fn port(lo: u16, proto: Proto) -> PortRange {
    PortRange::new(lo, 0, proto)
}

fn listed(ips: &[&str]) -> Peers {
    Peers::Listed {
        ips: ips.iter().map(|s| ip(s)).collect(),
        ips_label: "toEndpoints".into(),
        cidrs: vec![],
    }
}

fn spec(policy: &str, egress: Vec<EgressRule>) -> Spec {
    Spec {
        policy: policy.into(),
        label: format!("CiliumNetworkPolicy {policy}"),
        default_deny: true,
        egress,
    }
}

/// kube-dns at 10.96.0.10: `*.github.com` and `api.example.com` over UDP and TCP 53; HTTPS to
/// `*.github.com`; 10.0.0.0/8 except 10.96.0.0/12 on any port.
fn sample() -> PolicySet {
    let dns = EgressRule {
        index: 0,
        fqdns: vec![],
        peers: listed(&["10.96.0.10"]),
        ports: vec![PortEntry {
            ranges: vec![port(53, Proto::Udp), port(53, Proto::Tcp)],
            dns: Some(vec![pat("*.github.com"), exact("api.example.com")]),
        }],
    };
    let https = EgressRule {
        index: 1,
        fqdns: vec![pat("*.github.com")],
        peers: listed(&[]),
        ports: vec![PortEntry {
            ranges: vec![port(443, Proto::Tcp)],
            dns: None,
        }],
    };
    let cidr = EgressRule {
        index: 2,
        fqdns: vec![],
        peers: Peers::Listed {
            ips: Default::default(),
            ips_label: String::new(),
            cidrs: vec![CidrRule {
                cidr: Cidr::new(ip("10.0.0.0"), 8).expect("valid"),
                except: vec![Cidr::new(ip("10.96.0.0"), 12).expect("valid")],
                label: "toCIDRSet[0] 10.0.0.0/8".into(),
            }],
        },
        ports: vec![],
    };
    let open = spec("other/open", vec![]);
    let mut open = open;
    open.default_deny = false;
    PolicySet::new(vec![spec("default/web", vec![dns, https, cidr]), open]).expect("valid")
}

#[test]
fn dns_verdicts() {
    let set = sample();
    let web = set.identity(&[0]).expect("identity");
    let open = set.identity(&[1]).expect("identity");
    assert_eq!(set.identity(&[0, 0]).expect("same"), web);
    let k = Some(ip("10.96.0.10"));
    let cases: &[DnsCase] = &[
        (Some(web), k, 53, Proto::Udp, "api.github.com", "dns-name"),
        (Some(web), k, 53, Proto::Tcp, "API.GitHub.com.", "dns-name"),
        (Some(web), k, 53, Proto::Udp, "api.example.com", "dns-name"),
        (
            Some(web),
            None,
            53,
            Proto::Udp,
            "api.example.com",
            "dns-name",
        ),
        (
            Some(web),
            k,
            53,
            Proto::Udp,
            "github.com",
            "name-not-allowed",
        ),
        (
            Some(web),
            k,
            53,
            Proto::Udp,
            "a.b.github.com",
            "name-not-allowed",
        ),
        (Some(web), k, 53, Proto::Sctp, "api.github.com", "no-rule"),
        (Some(web), k, 5353, Proto::Udp, "api.github.com", "no-rule"),
        // 8.8.8.8 is outside both the kube-dns set and 10/8.
        (
            Some(web),
            Some(ip("8.8.8.8")),
            53,
            Proto::Udp,
            "api.github.com",
            "no-rule",
        ),
        // 10.1.0.1 is in the toCIDRSet rule, which has no toPorts: every name, every port.
        (
            Some(web),
            Some(ip("10.1.0.1")),
            53,
            Proto::Udp,
            "evil.com",
            "dns-open",
        ),
        (Some(open), k, 53, Proto::Udp, "evil.com", "unrestricted"),
        (
            None,
            k,
            53,
            Proto::Udp,
            "api.github.com",
            "unknown-endpoint",
        ),
    ];
    for (id, server, p, proto, qname, want) in cases {
        let v = set
            .dns_verdict(*id, *server, *p, *proto, &name(qname))
            .expect("known identity");
        assert_eq!(PolicySet::kind(&v), *want, "{qname} {server:?} {p}");
        assert_eq!(
            v.allowed(),
            ["dns-name", "dns-open", "unrestricted"].contains(want)
        );
        // The hot paths agree: yes/no, and the outcome with the denial's cause left open.
        if let (Some(i), Some(s)) = (id, server) {
            assert_eq!(
                set.dns_allowed(*i, *s, *p, *proto, &name(qname)),
                v.allowed(),
                "{qname} {s} {p}"
            );
        }
        let outcome = set
            .dns_outcome(*id, *server, *p, *proto, &name(qname))
            .expect("known identity");
        match outcome {
            Some(o) => assert_eq!(o, v.outcome),
            None => {
                assert!(["no-rule", "name-not-allowed"].contains(want));
                let i = id.expect("a denial by rules has an identity");
                assert_eq!(set.dns_denial(i, *server, *p, *proto), Ok(v.outcome));
            }
        }
    }
    assert!(set
        .dns_verdict(Some(99), k, 53, Proto::Udp, &name("a.com"))
        .is_err());
    assert!(!set.dns_allowed(99, ip("10.96.0.10"), 53, Proto::Udp, &name("a.com")));
    assert_eq!(set.is_restricted(web), Ok(true));
    assert_eq!(set.is_restricted(open), Ok(false));
    assert!(set.is_restricted(99).is_err());
}

#[test]
fn dns_verdict_names_the_first_selector_that_allows() {
    // Both entries' selectors match x.a.com; the first admits only TCP, the second UDP.
    let rule = EgressRule {
        index: 0,
        fqdns: vec![],
        peers: Peers::Any,
        ports: vec![
            PortEntry {
                ranges: vec![port(53, Proto::Tcp)],
                dns: Some(vec![pat("*.a.com"), exact("x.a.com")]),
            },
            PortEntry {
                ranges: vec![port(53, Proto::Any)],
                dns: Some(vec![exact("x.a.com"), pat("**.a.com")]),
            },
        ],
    };
    let set = PolicySet::new(vec![spec("ns/a", vec![rule])]).expect("valid");
    let id = set.identity(&[0]).expect("identity");
    let sel = |p| {
        let v = set
            .dns_verdict(Some(id), None, 53, p, &name("x.a.com"))
            .expect("ok");
        set.selector_of(&v)
    };
    assert_eq!(
        sel(Proto::Tcp).as_deref(),
        Some("toPorts[0].rules.dns[0].matchPattern: \"*.a.com\"")
    );
    assert_eq!(
        sel(Proto::Udp).as_deref(),
        Some("toPorts[1].rules.dns[0].matchName: \"x.a.com\"")
    );
}

#[test]
fn dns_explanations() {
    let set = sample();
    let web = set.identity(&[0]).expect("identity");
    let k = Some(ip("10.96.0.10"));
    let v = set
        .dns_verdict(Some(web), k, 53, Proto::Udp, &name("api.github.com"))
        .expect("ok");
    assert_eq!(set.policy_of(&v), Some("default/web"));
    assert_eq!(set.rule_index_of(&v), Some(0));
    assert_eq!(
        set.selector_of(&v).as_deref(),
        Some("toPorts[0].rules.dns[0].matchPattern: \"*.github.com\"")
    );
    assert_eq!(
        set.reason(&v),
        "allowed by CiliumNetworkPolicy default/web egress rule 0: \
         toPorts[0].rules.dns[0].matchPattern: \"*.github.com\" matches the name, and the rule \
         allows DNS to 10.96.0.10 port 53/UDP"
    );
    let v = set
        .dns_verdict(Some(web), k, 53, Proto::Udp, &name("evil.com"))
        .expect("ok");
    assert_eq!(set.policy_of(&v), None);
    assert_eq!(
        set.reason(&v),
        "denied: the endpoint is selected by egress policy (CiliumNetworkPolicy default/web), so \
         egress is default-deny; rules allow DNS to 10.96.0.10 port 53/UDP but no rules.dns \
         selector of theirs matches the name"
    );
}

#[test]
fn egress_verdicts() {
    let set = sample();
    let web = set.identity(&[0]).expect("identity");
    let gh = vec![(name("api.github.com."), "api.github.com.".to_owned())];
    let other = vec![(name("evil.com."), "evil.com.".to_owned())];
    let cases: &[EgressCase] = &[
        ("140.82.112.3", 443, &gh, "fqdn"),
        ("140.82.112.3", 80, &gh, "names-not-allowed"),
        ("140.82.112.3", 443, &other, "names-not-allowed"),
        ("140.82.112.3", 443, &[], "no-names"),
        ("10.2.3.4", 8080, &[], "peer"),
        ("10.96.0.20", 8080, &[], "no-names"),
    ];
    for (dst, p, names, want) in cases {
        let v = set
            .egress_verdict(Some(web), ip(dst), *p, Proto::Tcp, names)
            .expect("ok");
        assert_eq!(PolicySet::kind(&v), *want, "{dst}:{p}");
    }
    let v = set
        .egress_verdict(Some(web), ip("140.82.112.3"), 443, Proto::Tcp, &gh)
        .expect("ok");
    assert_eq!(set.rule_index_of(&v), Some(1));
    assert_eq!(
        set.selector_of(&v).as_deref(),
        Some("toFQDNs[0].matchPattern: \"*.github.com\"")
    );
    assert!(set.reason(&v).contains("matches api.github.com."));
    let v = set
        .egress_verdict(Some(web), ip("10.2.3.4"), 1, Proto::Udp, &[])
        .expect("ok");
    assert_eq!(
        set.selector_of(&v).as_deref(),
        Some("toCIDRSet[0] 10.0.0.0/8")
    );
}

#[test]
fn rules_or_across_specs() {
    let a = spec(
        "ns/a",
        vec![EgressRule {
            index: 0,
            fqdns: vec![],
            peers: Peers::Any,
            ports: vec![PortEntry {
                ranges: vec![port(53, Proto::Any)],
                dns: Some(vec![pat("*.a.com")]),
            }],
        }],
    );
    let b = spec(
        "ns/b",
        vec![EgressRule {
            index: 0,
            fqdns: vec![],
            peers: Peers::Any,
            ports: vec![PortEntry {
                ranges: vec![port(53, Proto::Udp)],
                dns: Some(vec![pat("**.b.com")]),
            }],
        }],
    );
    let set = PolicySet::new(vec![a, b]).expect("valid");
    let both = set.identity(&[1, 0]).expect("identity");
    let only_a = set.identity(&[0]).expect("identity");
    let q = |id, n: &str, p| {
        let v = set
            .dns_verdict(Some(id), Some(ip("1.1.1.1")), 53, p, &name(n))
            .expect("ok");
        (v.allowed(), set.policy_of(&v).map(str::to_owned))
    };
    assert_eq!(q(both, "x.a.com", Proto::Tcp), (true, Some("ns/a".into())));
    assert_eq!(
        q(both, "x.y.b.com", Proto::Udp),
        (true, Some("ns/b".into()))
    );
    assert_eq!(q(both, "x.y.b.com", Proto::Tcp), (false, None));
    assert_eq!(q(only_a, "x.y.b.com", Proto::Udp), (false, None));
    assert_eq!(set.identity_count(), 2);
}

#[test]
fn bad_input() {
    assert!(set_with_unknown_spec().is_err());
    assert!(Cidr::new(ip("10.0.0.0"), 40).is_err());
}

fn set_with_unknown_spec() -> Result<u32, PolicyBuildError> {
    PolicySet::new(vec![])?.identity(&[3])
}

/// Eight specs, spec `i` allowing `*.s{i}.com` from any server on 53/UDP.
fn eight_specs() -> PolicySet {
    let specs = (0..8)
        .map(|i| {
            spec(
                &format!("ns/s{i}"),
                vec![EgressRule {
                    index: 0,
                    fqdns: vec![],
                    peers: Peers::Any,
                    ports: vec![PortEntry {
                        ranges: vec![port(53, Proto::Udp)],
                        dns: Some(vec![pat(&format!("*.s{i}.com"))]),
                    }],
                }],
            )
        })
        .collect();
    PolicySet::new(specs).expect("valid")
}

fn subset(mask: u32) -> Vec<u32> {
    (0..8).filter(|i| mask & (1 << i) != 0).collect()
}

fn check_subset(set: &PolicySet, mask: u32, id: u32) {
    for i in 0..8 {
        let allowed = set.dns_allowed(
            id,
            ip("1.1.1.1"),
            53,
            Proto::Udp,
            &name(&format!("a.s{i}.com")),
        );
        // No spec selecting: unrestricted.
        let want = mask == 0 || mask & (1 << i) != 0;
        assert_eq!(allowed, want, "mask {mask:#x} spec {i}");
    }
}

#[test]
fn many_identities_keep_their_numbers() {
    let set = eight_specs();
    // 256 identities cross several bucket boundaries of the identity list (1, 2, 4, ... 128).
    let ids: Vec<u32> = (0..256)
        .map(|m| set.identity(&subset(m)).expect("identity"))
        .collect();
    assert_eq!(ids, (0..256).collect::<Vec<u32>>());
    assert_eq!(set.identity_count(), 256);
    for (mask, &id) in ids.iter().enumerate() {
        check_subset(&set, mask as u32, id);
        assert_eq!(set.is_restricted(id), Ok(mask != 0));
    }
    assert!(set.is_restricted(256).is_err());
    assert!(set.is_restricted(u32::MAX).is_err());
}

#[test]
fn identities_from_many_threads() {
    let set = eight_specs();
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            let set = &set;
            scope.spawn(move || {
                for k in 0..256u32 {
                    let mask = (k * 7 + t * 61) % 256;
                    let id = set.identity(&subset(mask)).expect("identity");
                    check_subset(set, mask, id);
                }
            });
        }
    });
    assert_eq!(set.identity_count(), 256);
}

#[test]
fn a_selector_many_specs_share_counts_only_for_the_selecting_ones() {
    // 50 specs allow `*.shared.com`; spec i admits only port 1000 + i.
    let specs = (0..50u16)
        .map(|i| {
            spec(
                &format!("ns/s{i}"),
                vec![EgressRule {
                    index: 0,
                    fqdns: vec![],
                    peers: Peers::Any,
                    ports: vec![PortEntry {
                        ranges: vec![port(1000 + i, Proto::Udp)],
                        dns: Some(vec![exact("other.com"), pat("*.shared.com")]),
                    }],
                }],
            )
        })
        .collect();
    let set = PolicySet::new(specs).expect("valid");
    let q = |specs: &[u32], p: u16| {
        let id = set.identity(specs).expect("identity");
        let v = set
            .dns_verdict(Some(id), None, p, Proto::Udp, &name("a.shared.com"))
            .expect("ok");
        (PolicySet::kind(&v), set.policy_of(&v).map(str::to_owned))
    };
    assert_eq!(q(&[49], 1049), ("dns-name", Some("ns/s49".into())));
    assert_eq!(q(&[49], 1048), ("no-rule", None));
    assert_eq!(q(&[3, 40], 1040), ("dns-name", Some("ns/s40".into())));
    assert_eq!(q(&[3, 40], 1003), ("dns-name", Some("ns/s3".into())));
    assert_eq!(q(&[3, 40], 1004), ("no-rule", None));
    // The one spec selecting admits the port but not the name.
    let id = set.identity(&[7]).expect("identity");
    let v = set
        .dns_verdict(Some(id), None, 1007, Proto::Udp, &name("a.other.com"))
        .expect("ok");
    assert_eq!(PolicySet::kind(&v), "name-not-allowed");
}
