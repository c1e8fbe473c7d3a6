use std::fmt;
use std::net::IpAddr;

/// Input the compiled policy cannot accept. Policies are validated (with file and line) before
/// they are compiled, so these point at a caller's mistake rather than at a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyBuildError {
    /// A prefix length beyond the address family's width.
    BadPrefix { addr: IpAddr, bits: u8 },
    /// A protocol other than TCP, UDP, SCTP or ANY.
    BadProtocol { text: String },
    /// A query's protocol that is not one concrete protocol (TCP, UDP or SCTP).
    BadQueryProtocol { text: String },
    /// An address that does not parse.
    BadAddress { text: String },
    /// An identity or spec number that was never handed out.
    UnknownIndex { what: &'static str, index: u32 },
    /// More specs, rules or selectors than a `u32` counts.
    TooMany { what: &'static str },
}

impl fmt::Display for PolicyBuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyBuildError::BadPrefix { addr, bits } => {
                write!(f, "invalid prefix {addr}/{bits}: the length is too long")
            }
            PolicyBuildError::BadProtocol { text } => write!(
                f,
                "invalid protocol {text:?}: expected TCP, UDP, SCTP or ANY"
            ),
            PolicyBuildError::BadQueryProtocol { text } => write!(
                f,
                "invalid protocol {text:?} for a query: expected TCP, UDP or SCTP"
            ),
            PolicyBuildError::BadAddress { text } => {
                write!(f, "invalid IP address {text:?}")
            }
            PolicyBuildError::UnknownIndex { what, index } => {
                write!(f, "no {what} with number {index}")
            }
            PolicyBuildError::TooMany { what } => write!(f, "too many {what}"),
        }
    }
}

impl std::error::Error for PolicyBuildError {}
