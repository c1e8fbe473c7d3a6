use std::fmt;

/// What was being read when an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A policy's `matchPattern`.
    MatchPattern,
    /// A policy's `matchName`.
    MatchName,
    /// A DNS name in presentation form given to be matched.
    Name,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::MatchPattern => "matchPattern",
            Source::MatchName => "matchName",
            Source::Name => "name",
        }
    }
}

/// Why a pattern or name was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternErrorKind {
    /// The text is empty.
    Empty,
    /// More characters than Cilium's schema allows (255).
    TooLong { len: usize },
    /// A character outside `[-a-zA-Z0-9_.*]` (or `*` where it is not allowed).
    BadChar { ch: char, pos: usize },
    /// `*` in a `matchName`.
    StarInName { pos: usize },
    /// An empty label: a leading dot, two dots in a row, or a lone `.`.
    EmptyLabel { pos: usize },
    /// A label of a name to match is longer than 63 bytes (RFC 1035 2.3.4).
    LabelTooLong { pos: usize, len: usize },
    /// A name to match is longer than 255 bytes in wire form (RFC 1035 2.3.4).
    NameTooLong { len: usize },
    /// A backslash escape that is cut short or names a value above 255.
    BadEscape { pos: usize },
}

/// A malformed `matchName`, `matchPattern` or name: says what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    pub source: Source,
    pub text: String,
    pub kind: PatternErrorKind,
}

impl PatternError {
    pub(crate) fn new(source: Source, text: &str, kind: PatternErrorKind) -> Self {
        let mut text = text.to_owned();
        if text.len() > 300 {
            let mut cut = 300;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        PatternError { source, text, kind }
    }
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: ", self.source.as_str(), self.text)?;
        match &self.kind {
            PatternErrorKind::Empty => write!(f, "it is empty"),
            PatternErrorKind::TooLong { len } => {
                write!(f, "{len} characters, more than the 255 allowed")
            }
            PatternErrorKind::BadChar { ch, pos } => write!(
                f,
                "character {ch:?} at position {pos} is not allowed (only letters, digits, '-', '_', '.'{})",
                if self.source == Source::MatchPattern { " and '*'" } else { "" }
            ),
            PatternErrorKind::StarInName { pos } => write!(
                f,
                "'*' at position {pos} is not allowed in a matchName (use matchPattern for wildcards)"
            ),
            PatternErrorKind::EmptyLabel { pos } => {
                write!(f, "empty label at position {pos} (a leading dot, '..', or a lone '.')")
            }
            PatternErrorKind::LabelTooLong { pos, len } => {
                write!(f, "label at position {pos} is {len} bytes long, more than 63")
            }
            PatternErrorKind::NameTooLong { len } => {
                write!(f, "{len} bytes in wire form, more than 255")
            }
            PatternErrorKind::BadEscape { pos } => write!(f, "bad escape at position {pos}"),
        }
    }
}

impl std::error::Error for PatternError {}
