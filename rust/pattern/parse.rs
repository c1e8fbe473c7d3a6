//! Validation and normalisation of `matchName` and `matchPattern`, as Cilium's CRD schema and
//! its `matchpattern` package define them (Cilium 1.19+, with the leading `**.`).

use super::error::{PatternError, PatternErrorKind, Source};

/// Cilium's schema limit on a matchName / matchPattern string.
const MAX_LEN: usize = 255;

/// One label of a compiled pattern, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabelPat {
    /// A literal label.
    Exact(Box<[u8]>),
    /// A label with `*` (runs of stars collapsed to one): each `*` stands for zero or more of
    /// `[-a-z0-9_]`, never a dot.
    Glob(Box<[u8]>),
}

/// A validated matchName or matchPattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Lower case and absolute (trailing dot); a lone `*` stays `*` as in Cilium.
    pub normalized: String,
    /// Made only of stars (optionally followed by one dot): matches every name.
    pub match_all: bool,
    /// Began with `**.`: one or more whole labels stand before `labels`.
    pub multi: bool,
    /// The remaining labels, leaf first, as written.
    pub labels: Vec<LabelPat>,
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == '*'
}

fn check_chars(text: &str, source: Source) -> Result<(), PatternError> {
    let err = |kind| Err(PatternError::new(source, text, kind));
    if text.is_empty() {
        return err(PatternErrorKind::Empty);
    }
    let len = text.chars().count();
    if len > MAX_LEN {
        return err(PatternErrorKind::TooLong { len });
    }
    for (pos, ch) in text.chars().enumerate() {
        if !allowed(ch) {
            return err(PatternErrorKind::BadChar { ch, pos });
        }
        if ch == '*' && source == Source::MatchName {
            return err(PatternErrorKind::StarInName { pos });
        }
    }
    Ok(())
}

fn normalize(text: &str) -> String {
    let mut s = text.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

fn parse(text: &str, source: Source) -> Result<Parsed, PatternError> {
    check_chars(text, source)?;
    // All characters are ASCII from here on, so byte positions are character positions.
    let body = text.strip_suffix('.').unwrap_or(text);
    if body.is_empty() {
        return Err(PatternError::new(
            source,
            text,
            PatternErrorKind::EmptyLabel { pos: 0 },
        ));
    }
    if body.bytes().all(|b| b == b'*') {
        let normalized = if text == "*" {
            "*".to_owned()
        } else {
            normalize(text)
        };
        return Ok(Parsed {
            normalized,
            match_all: true,
            multi: false,
            labels: Vec::new(),
        });
    }
    let mut labels = Vec::new();
    let mut start = 0;
    for part in body.split('.') {
        if part.is_empty() {
            return Err(PatternError::new(
                source,
                text,
                PatternErrorKind::EmptyLabel { pos: start },
            ));
        }
        labels.push(compile_label(part));
        start += part.len() + 1;
    }
    // A first label of two or more stars followed by more labels is the multi-level prefix.
    let first = body.split('.').next().unwrap_or_default();
    let multi = labels.len() > 1 && first.len() >= 2 && first.bytes().all(|b| b == b'*');
    if multi {
        labels.remove(0);
    }
    Ok(Parsed {
        normalized: normalize(text),
        match_all: false,
        multi,
        labels,
    })
}

fn compile_label(part: &str) -> LabelPat {
    let lower = part.to_ascii_lowercase().into_bytes();
    if !lower.contains(&b'*') {
        return LabelPat::Exact(lower.into_boxed_slice());
    }
    let mut out = Vec::with_capacity(lower.len());
    for b in lower {
        if !(b == b'*' && out.last() == Some(&b'*')) {
            out.push(b);
        }
    }
    LabelPat::Glob(out.into_boxed_slice())
}

/// Parses a `matchPattern`.
pub fn parse_match_pattern(text: &str) -> Result<Parsed, PatternError> {
    parse(text, Source::MatchPattern)
}

/// Parses a `matchName` (no wildcards).
pub fn parse_match_name(text: &str) -> Result<Parsed, PatternError> {
    parse(text, Source::MatchName)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> LabelPat {
        LabelPat::Exact(s.as_bytes().into())
    }
    fn gl(s: &str) -> LabelPat {
        LabelPat::Glob(s.as_bytes().into())
    }

    #[test]
    fn valid_patterns() {
        let cases: &[(&str, &str, bool, bool, Vec<LabelPat>)] = &[
            (
                "*.Example.com",
                "*.example.com.",
                false,
                false,
                vec![gl("*"), ex("example"), ex("com")],
            ),
            (
                "example.com.",
                "example.com.",
                false,
                false,
                vec![ex("example"), ex("com")],
            ),
            (
                "**.cilium.io",
                "**.cilium.io.",
                false,
                true,
                vec![ex("cilium"), ex("io")],
            ),
            (
                "***.cilium.io",
                "***.cilium.io.",
                false,
                true,
                vec![ex("cilium"), ex("io")],
            ),
            (
                "a**b.io",
                "a**b.io.",
                false,
                false,
                vec![gl("a*b"), ex("io")],
            ),
            (
                "x.**.io",
                "x.**.io.",
                false,
                false,
                vec![ex("x"), gl("*"), ex("io")],
            ),
            ("*", "*", true, false, vec![]),
            ("**", "**.", true, false, vec![]),
            ("*.", "*.", true, false, vec![]),
            ("**.", "**.", true, false, vec![]),
            (
                "api-*-prod.x",
                "api-*-prod.x.",
                false,
                false,
                vec![gl("api-*-prod"), ex("x")],
            ),
            ("**.*.x", "**.*.x.", false, true, vec![gl("*"), ex("x")]),
            ("com", "com.", false, false, vec![ex("com")]),
        ];
        for (text, norm, all, multi, labels) in cases {
            let p = parse_match_pattern(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(&p.normalized, norm, "{text}");
            assert_eq!(p.match_all, *all, "{text}");
            assert_eq!(p.multi, *multi, "{text}");
            assert_eq!(&p.labels, labels, "{text}");
        }
    }

    #[test]
    fn invalid() {
        use PatternErrorKind::*;
        let long = "a".repeat(256);
        let cases: &[(Source, &str, PatternErrorKind)] = &[
            (Source::MatchPattern, "", Empty),
            (Source::MatchPattern, ".", EmptyLabel { pos: 0 }),
            (Source::MatchPattern, ".example.com", EmptyLabel { pos: 0 }),
            (Source::MatchPattern, "a..b", EmptyLabel { pos: 2 }),
            (Source::MatchPattern, "a.b..", EmptyLabel { pos: 4 }),
            (
                Source::MatchPattern,
                "exa mple.com",
                BadChar { ch: ' ', pos: 3 },
            ),
            (
                Source::MatchPattern,
                "a.[b].com",
                BadChar { ch: '[', pos: 2 },
            ),
            (Source::MatchPattern, "é.com", BadChar { ch: 'é', pos: 0 }),
            (Source::MatchPattern, &long, TooLong { len: 256 }),
            (Source::MatchName, "*.example.com", StarInName { pos: 0 }),
            (Source::MatchName, "a.b*", StarInName { pos: 3 }),
            (Source::MatchName, "a+b.com", BadChar { ch: '+', pos: 1 }),
            (Source::MatchName, "", Empty),
        ];
        for (source, text, kind) in cases {
            let e = parse(text, *source).expect_err(text);
            assert_eq!(&e.kind, kind, "{text:?}");
        }
    }

    #[test]
    fn longest_allowed() {
        let s = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63)
        );
        assert_eq!(s.len(), 255);
        assert!(parse_match_name(&s).is_ok());
    }

    #[test]
    fn error_message_names_position() {
        let e = parse_match_pattern("foo.b@r.com").expect_err("bad");
        assert_eq!(
            e.to_string(),
            "invalid matchPattern \"foo.b@r.com\": character '@' at position 5 is not allowed \
             (only letters, digits, '-', '_', '.' and '*')"
        );
    }
}
