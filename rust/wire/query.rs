//! The hot-path view of a query: the header and its one question, no vectors, no strings.

use super::error::{WireError, WireErrorKind};
use super::message::{walk, Edns, Header};
use super::name::Name;
use super::types;
use crate::pattern::LabelBuf;

/// A validated query: QR clear, opcode QUERY, exactly one question, and the whole packet well
/// formed (every record read and checked, no trailing bytes) — but nothing built. The proxy
/// engine matches [`QueryView::labels`] against a [`crate::pattern::PatternTrie`] without
/// making a string, then forwards or answers using [`QueryView::question_end`].
///
/// ```
/// use _core::wire::QueryView;
/// // id 0x1234, RD, one question: www.example.com IN A
/// let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
///           \x03www\x07example\x03com\x00\x00\x01\x00\x01";
/// let v = QueryView::parse(q).unwrap();
/// assert_eq!((v.header.id, v.qtype, v.qclass, v.question_end), (0x1234, 1, 1, q.len()));
/// assert_eq!(v.labels().label(1), b"example");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct QueryView<'a> {
    pub header: Header,
    /// The question name, a view into the packet (case kept).
    pub qname: Name<'a>,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past the question: `&packet[12..question_end]` is the question in wire form
    /// (possibly with a compression pointer back into the header, which is legal).
    pub question_end: usize,
    /// The query's OPT record, if any.
    pub edns: Option<Edns<'a>>,
}

impl<'a> QueryView<'a> {
    /// Validates `buf` as a query (QR clear, opcode QUERY, exactly one question, well formed).
    pub fn parse(buf: &'a [u8]) -> Result<QueryView<'a>, WireError> {
        let header = Header::parse(buf)?;
        if header.qr() {
            return Err(WireError::new(WireErrorKind::NotAQuery, 2));
        }
        if header.opcode() != types::OPCODE_QUERY {
            return Err(WireError::new(
                WireErrorKind::BadOpcode {
                    opcode: header.opcode(),
                },
                2,
            ));
        }
        if header.qdcount != 1 {
            return Err(WireError::new(
                WireErrorKind::QuestionCount {
                    count: header.qdcount,
                },
                4,
            ));
        }
        let mut question = None;
        let walked = walk(buf, |q| question = Some(q), |_, _| {})?;
        let q = question.ok_or(WireError::new(WireErrorKind::QuestionCount { count: 0 }, 4))?;
        Ok(QueryView {
            header,
            qname: q.name,
            qtype: q.qtype,
            qclass: q.qclass,
            question_end: walked.questions_end,
            edns: walked.edns,
        })
    }

    /// The question name lower-cased into a [`LabelBuf`], leaf first, each wire label kept
    /// whole (a `.` inside a label stays inside it). Filled with [`LabelBuf::push_label`].
    pub fn labels(&self) -> LabelBuf {
        self.qname.to_label_buf()
    }
}
