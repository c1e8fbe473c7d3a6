//! The L3/L4 vocabulary of a compiled rule: protocols, port ranges, CIDRs, and peer sets.

use std::net::{IpAddr, Ipv4Addr};

use hashbrown::HashSet;

use super::error::PolicyBuildError;

/// An L4 protocol as Cilium's `toPorts[].ports[].protocol` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    /// In a rule: any of the above. A query is always one concrete protocol.
    Any,
}

impl Proto {
    /// Parses a protocol name, ignoring case (`"udp"`, `"UDP"`).
    pub fn parse(text: &str) -> Option<Proto> {
        match text {
            "UDP" => return Some(Proto::Udp),
            "TCP" => return Some(Proto::Tcp),
            _ => {}
        }
        [Proto::Tcp, Proto::Udp, Proto::Sctp, Proto::Any]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(text))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
            Proto::Any => "ANY",
        }
    }

    /// True when a rule naming `self` admits traffic of protocol `query`.
    fn admits(self, query: Proto) -> bool {
        self == Proto::Any || self == query
    }
}

/// Parses an address exactly as `IpAddr::from_str` does, with a short path for the common
/// dotted-quad IPv4 text (a DNS server or a destination, once per query).
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    match dotted_quad(text.as_bytes()) {
        Some(v4) => Some(IpAddr::V4(v4)),
        None => text.parse().ok(),
    }
}

/// Four decimal octets of 1 to 3 digits, no leading zero, at most 255, dot-separated; None for
/// anything else (which the standard parser then decides).
fn dotted_quad(text: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let (mut at, mut value, mut digits) = (0usize, 0u16, 0u8);
    for &b in text {
        if b == b'.' {
            if digits == 0 || at == 3 {
                return None;
            }
            octets[at] = value as u8;
            (at, value, digits) = (at + 1, 0, 0);
        } else if b.is_ascii_digit() {
            if digits == 3 || (digits == 1 && value == 0) {
                return None;
            }
            value = value * 10 + u16::from(b - b'0');
            if value > 255 {
                return None;
            }
            digits += 1;
        } else {
            return None;
        }
    }
    if at != 3 || digits == 0 {
        return None;
    }
    octets[3] = value as u8;
    Some(Ipv4Addr::from(octets))
}

/// One `ports[]` entry: `port`..=`endPort` over a protocol. `lo == 0` stands for every port, as
/// Cilium's port `"0"` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    pub proto: Proto,
}

impl PortRange {
    /// An `endPort` below `port` (or 0, absent) means the single port, as in Cilium.
    pub fn new(lo: u16, hi: u16, proto: Proto) -> Self {
        PortRange {
            lo,
            hi: hi.max(lo),
            proto,
        }
    }

    pub fn admits(&self, port: u16, proto: Proto) -> bool {
        self.proto.admits(proto) && (self.lo == 0 || (self.lo <= port && port <= self.hi))
    }
}

/// A prefix: the address with its host bits cleared, and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

fn mask_v4(bits: u8) -> u32 {
    if bits == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(bits))
    }
}

fn mask_v6(bits: u8) -> u128 {
    if bits == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(bits))
    }
}

impl Cidr {
    pub fn new(addr: IpAddr, bits: u8) -> Result<Self, PolicyBuildError> {
        let addr = match addr {
            IpAddr::V4(a) if bits <= 32 => IpAddr::V4((u32::from(a) & mask_v4(bits)).into()),
            IpAddr::V6(a) if bits <= 128 => IpAddr::V6((u128::from(a) & mask_v6(bits)).into()),
            _ => return Err(PolicyBuildError::BadPrefix { addr, bits }),
        };
        Ok(Cidr { addr, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => u32::from(a) & mask_v4(self.bits) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                u128::from(a) & mask_v6(self.bits) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// A `toCIDR` entry or a `toCIDRSet` entry with its `except` list, and how to show it.
#[derive(Debug, Clone)]
pub struct CidrRule {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
    /// How a verdict names it, e.g. `toCIDRSet[0] 10.0.0.0/8 except 10.96.0.0/12`.
    pub label: String,
}

impl CidrRule {
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// Which destinations (or DNS servers) a rule's L3 part admits.
#[derive(Debug, Clone)]
pub enum Peers {
    /// No L3 selector: every destination (a rule with only `toPorts`).
    Any,
    /// Single addresses (of the endpoints `toEndpoints` selects, of the nodes an entity names,
    /// ...) and prefixes (`toCIDR`, `toCIDRSet`, an entity's ranges). Both empty admits nothing
    /// (e.g. a selector matching no endpoint).
    Listed {
        ips: HashSet<IpAddr>,
        /// How a verdict names an address of `ips`: `toEndpoints`, `toEntities host`, ...
        ips_label: String,
        cidrs: Vec<CidrRule>,
    },
}

/// Why a peer set admitted an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMatch {
    /// The rule has no L3 selector.
    Any,
    /// The address is one of the rule's single addresses (`ips`).
    Endpoint,
    /// The `toCIDR` / `toCIDRSet` entry with this index in the rule's list.
    Cidr(u32),
}

impl Peers {
    /// Why `ip` is admitted, or None. A missing `ip` (the server was not given) is admitted by
    /// any peer set that is not empty.
    pub fn admits(&self, ip: Option<IpAddr>) -> Option<PeerMatch> {
        match self {
            Peers::Any => Some(PeerMatch::Any),
            Peers::Listed { ips, cidrs, .. } => match ip {
                None if !ips.is_empty() => Some(PeerMatch::Endpoint),
                None => (!cidrs.is_empty()).then_some(PeerMatch::Cidr(0)),
                Some(ip) => {
                    if ips.contains(&ip) {
                        return Some(PeerMatch::Endpoint);
                    }
                    let at = cidrs.iter().position(|c| c.admits(ip))?;
                    Some(PeerMatch::Cidr(u32::try_from(at).unwrap_or(u32::MAX)))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn protocols() {
        assert_eq!(Proto::parse("udp"), Some(Proto::Udp));
        assert_eq!(Proto::parse("ANY"), Some(Proto::Any));
        assert_eq!(Proto::parse("icmp"), None);
        assert!(Proto::Any.admits(Proto::Sctp));
        assert!(!Proto::Tcp.admits(Proto::Udp));
    }

    #[test]
    fn addresses_parse_as_the_standard_parser_does() {
        let mut texts: Vec<String> = [
            "10.96.0.10",
            "0.0.0.0",
            "255.255.255.255",
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.04",
            "1.2.3.0",
            "1..3.4",
            ".1.2.3",
            "1.2.3.4.",
            "1.2.3.4 ",
            "",
            "1000.1.1.1",
            "1.2.3.255",
            "1.2.3.256",
            "::1",
            "fd00::5",
            "::ffff:1.2.3.4",
            "a.b.c.d",
            "1.2.3.-4",
            "+1.2.3.4",
            "0.00.0.0",
            "9.99.199.249",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Every text of up to 4 characters over a small alphabet, and some longer mixes.
        let alphabet = ['0', '1', '2', '5', '9', '.', ':', 'a'];
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            frontier = frontier
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            texts.extend(frontier.iter().cloned());
        }
        for a in ["0", "1", "25", "255", "256", "01", "199", "000"] {
            for b in ["0", "10", "250", "300"] {
                texts.push(format!("{a}.{b}.{a}.{b}"));
                texts.push(format!("{b}.{a}.{b}.{a}"));
            }
        }
        for t in &texts {
            assert_eq!(parse_ip(t), t.parse::<IpAddr>().ok(), "{t:?}");
        }
    }

    #[test]
    fn port_ranges() {
        let r = PortRange::new(8000, 8080, Proto::Tcp);
        assert!(r.admits(8000, Proto::Tcp) && r.admits(8080, Proto::Tcp));
        assert!(!r.admits(8081, Proto::Tcp) && !r.admits(8000, Proto::Udp));
        let all = PortRange::new(0, 0, Proto::Any);
        assert!(all.admits(1, Proto::Udp) && all.admits(65535, Proto::Tcp));
        let single = PortRange::new(53, 0, Proto::Udp);
        assert!(single.admits(53, Proto::Udp) && !single.admits(54, Proto::Udp));
    }

    #[test]
    fn cidrs() {
        let c = Cidr::new(ip("10.1.2.3"), 8).expect("valid");
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::ffff:10.0.0.1")));
        let all = Cidr::new(ip("0.0.0.0"), 0).expect("valid");
        assert!(all.contains(ip("1.2.3.4")) && !all.contains(ip("::1")));
        let v6 = Cidr::new(ip("2001:db8::"), 32).expect("valid");
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_err());
        assert!(Cidr::new(ip("::"), 129).is_err());
        let host = Cidr::new(ip("10.0.0.1"), 32).expect("valid");
        assert!(host.contains(ip("10.0.0.1")) && !host.contains(ip("10.0.0.2")));
    }

    #[test]
    fn peers() {
        let rule = CidrRule {
            cidr: Cidr::new(ip("10.0.0.0"), 8).expect("valid"),
            except: vec![Cidr::new(ip("10.96.0.0"), 12).expect("valid")],
            label: "toCIDRSet[0]".into(),
        };
        let p = Peers::Listed {
            ips: [ip("192.168.1.1")].into_iter().collect(),
            ips_label: "toEndpoints".into(),
            cidrs: vec![rule],
        };
        assert_eq!(p.admits(Some(ip("192.168.1.1"))), Some(PeerMatch::Endpoint));
        assert_eq!(p.admits(Some(ip("10.1.0.1"))), Some(PeerMatch::Cidr(0)));
        assert_eq!(p.admits(Some(ip("10.96.0.10"))), None);
        assert_eq!(p.admits(None), Some(PeerMatch::Endpoint));
        let empty = Peers::Listed {
            ips: HashSet::new(),
            ips_label: String::new(),
            cidrs: vec![],
        };
        assert_eq!(empty.admits(None), None);
        assert_eq!(Peers::Any.admits(Some(ip("1.1.1.1"))), Some(PeerMatch::Any));
    }
}
