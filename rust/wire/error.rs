use std::fmt;

/// Where in the message a record was being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Question,
    Answer,
    Authority,
    Additional,
}

impl Section {
    fn as_str(self) -> &'static str {
        match self {
            Section::Question => "question",
            Section::Answer => "answer",
            Section::Authority => "authority",
            Section::Additional => "additional",
        }
    }
}

/// Why a message (or a request to build one) was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireErrorKind {
    /// Fewer than 12 bytes: no room for the header.
    ShortHeader { len: usize },
    /// A field runs past the end of the packet (or of its RDATA).
    Truncated { what: &'static str },
    /// The header claims more records in a section than the packet holds.
    CountTooLarge {
        section: Section,
        claimed: u16,
        found: u16,
    },
    /// Bytes left over after the last record the header announces.
    TrailingBytes { count: usize },
    /// A label length byte of type 0b01 or 0b10 (extended / reserved; RFC 6891 5 retired them),
    /// which is also every "label" longer than 63 bytes.
    BadLabelType { byte: u8 },
    /// A name longer than 255 bytes in wire form, counting the root byte (RFC 1035 2.3.4).
    NameTooLong,
    /// A compression pointer that does not point strictly before the part of the name holding it.
    BadPointer { target: usize },
    /// More than [`super::MAX_POINTER_HOPS`] compression pointers in one name.
    TooManyPointers,
    /// A compression pointer where the type forbids compression (DNAME target, RFC 6672 2.5).
    CompressionForbidden,
    /// RDATA that is longer or shorter than its type consumes.
    RdataLength {
        rtype: u16,
        rdlength: u16,
        consumed: usize,
    },
    /// A TXT record with no character-string (RFC 1035 3.3.14: one or more).
    EmptyTxt,
    /// An OPT record in the wrong section, not owned by the root, or a second one (RFC 6891 6.1.1).
    BadOpt { why: &'static str },
    /// A query was expected and this is a response (QR set).
    NotAQuery,
    /// A query was expected and the opcode is not QUERY (0).
    BadOpcode { opcode: u8 },
    /// Exactly one question was expected.
    QuestionCount { count: u16 },
    /// An rcode outside 0..=4095, or above 15 for a query without OPT to carry the upper bits.
    BadRcode { rcode: i64 },
}

/// A malformed DNS message: what is wrong and at which byte offset it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub kind: WireErrorKind,
    /// Offset into the packet where the faulty field starts (0 for whole-message conditions).
    pub offset: usize,
}

impl WireError {
    pub(crate) fn new(kind: WireErrorKind, offset: usize) -> Self {
        WireError { kind, offset }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use WireErrorKind::*;
        f.write_str("malformed DNS message: ")?;
        match &self.kind {
            ShortHeader { len } => write!(f, "{len} bytes, shorter than the 12-byte header"),
            Truncated { what } => write!(f, "{what} runs past the end"),
            CountTooLarge {
                section,
                claimed,
                found,
            } => write!(
                f,
                "the header claims {claimed} {} records but the packet holds {found}",
                section.as_str()
            ),
            TrailingBytes { count } => write!(f, "{count} trailing bytes after the last record"),
            BadLabelType { byte } => write!(
                f,
                "label length byte {byte:#04x} is a reserved label type (labels are at most 63 bytes)"
            ),
            NameTooLong => f.write_str("name longer than 255 bytes"),
            BadPointer { target } => write!(
                f,
                "compression pointer to {target} does not point strictly before the name"
            ),
            TooManyPointers => write!(
                f,
                "more than {} compression pointers in one name",
                super::MAX_POINTER_HOPS
            ),
            CompressionForbidden => f.write_str("compressed name where compression is forbidden"),
            RdataLength {
                rtype,
                rdlength,
                consumed,
            } => write!(
                f,
                "RDLENGTH {rdlength} of a type {rtype} record does not match its data ({consumed} bytes)"
            ),
            EmptyTxt => f.write_str("TXT record without any character-string"),
            BadOpt { why } => write!(f, "bad OPT record: {why}"),
            NotAQuery => f.write_str("a query was expected, got a response (QR set)"),
            BadOpcode { opcode } => write!(f, "opcode {opcode} is not QUERY"),
            QuestionCount { count } => write!(f, "{count} questions, exactly one expected"),
            BadRcode { rcode } => write!(
                f,
                "rcode {rcode} is out of range (0..=4095, above 15 only with EDNS)"
            ),
        }?;
        write!(f, " (at byte {})", self.offset)
    }
}

impl std::error::Error for WireError {}
