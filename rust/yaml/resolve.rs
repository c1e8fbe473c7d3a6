//! PyYAML's YAML 1.1 implicit resolution of plain scalars (its `Resolver` regexes, written out
//! by hand). Kubernetes reads manifests YAML 1.1-style too: `yes`/`on` are booleans, `0x1F` and
//! `1:30` are integers, `2024-01-02` a timestamp, and an empty value is null.

use super::Tag;

/// The tag PyYAML gives a plain scalar (or one tagged `!`): its resolvers are tried in the order
/// PyYAML adds them (bool, float, int, merge, null, timestamp, value, yaml); `str` otherwise.
pub fn resolve_plain(value: &str) -> Tag {
    // Python's `$` also matches before one final newline.
    let v = value.strip_suffix('\n').unwrap_or(value).as_bytes();
    let Some(&first) = v.first() else {
        // `''` keyed resolvers: only null; a lone "\n" is not empty for `^(?:...)$`.
        return if value.is_empty() {
            Tag::Null
        } else {
            Tag::Str
        };
    };
    match first {
        b'y' | b'Y' | b'n' | b'N' | b't' | b'T' | b'f' | b'F' | b'o' | b'O' if is_bool(v) => {
            return Tag::Bool
        }
        _ => {}
    }
    if matches!(first, b'-' | b'+' | b'0'..=b'9' | b'.') && is_float(v) {
        return Tag::Float;
    }
    if matches!(first, b'-' | b'+' | b'0'..=b'9') && is_int(v) {
        return Tag::Int;
    }
    if v == b"<<" {
        return Tag::Merge;
    }
    if matches!(v, b"~" | b"null" | b"Null" | b"NULL") {
        return Tag::Null;
    }
    if first.is_ascii_digit() && is_timestamp(v) {
        return Tag::Timestamp;
    }
    if v == b"=" {
        return Tag::Value;
    }
    if matches!(v, b"!" | b"&" | b"*") {
        return Tag::Yaml;
    }
    Tag::Str
}

fn is_bool(v: &[u8]) -> bool {
    matches!(
        v,
        b"yes"
            | b"Yes"
            | b"YES"
            | b"no"
            | b"No"
            | b"NO"
            | b"true"
            | b"True"
            | b"TRUE"
            | b"false"
            | b"False"
            | b"FALSE"
            | b"on"
            | b"On"
            | b"ON"
            | b"off"
            | b"Off"
            | b"OFF"
    )
}

/// A cursor over bytes for the hand-written regexes.
struct Cur<'a> {
    v: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn new(v: &'a [u8]) -> Self {
        Cur { v, at: 0 }
    }
    fn peek(&self) -> Option<u8> {
        self.v.get(self.at).copied()
    }
    fn eat(&mut self, pred: impl Fn(u8) -> bool) -> bool {
        match self.peek() {
            Some(c) if pred(c) => {
                self.at += 1;
                true
            }
            _ => false,
        }
    }
    fn eat_str(&mut self, s: &[u8]) -> bool {
        if self.v[self.at..].starts_with(s) {
            self.at += s.len();
            true
        } else {
            false
        }
    }
    /// Zero or more; returns how many.
    fn many(&mut self, pred: impl Fn(u8) -> bool) -> usize {
        let start = self.at;
        while self.eat(&pred) {}
        self.at - start
    }
    fn sign(&mut self) {
        self.eat(|c| c == b'-' || c == b'+');
    }
    fn done(&self) -> bool {
        self.at == self.v.len()
    }
}

fn digit(c: u8) -> bool {
    c.is_ascii_digit()
}
fn digit_(c: u8) -> bool {
    c.is_ascii_digit() || c == b'_'
}

/// `(?:[eE][-+][0-9]+)?` then the end.
fn exponent_end(c: &mut Cur<'_>) -> bool {
    if c.eat(|x| x == b'e' || x == b'E')
        && (!c.eat(|x| x == b'-' || x == b'+') || c.many(digit) == 0)
    {
        return false;
    }
    c.done()
}

/// `(?::[0-5]?[0-9])+` : one or more sexagesimal groups. Backtracking is not needed: each group
/// takes at most two digits, the first of them 0-5, and what follows is `:`, `.` or the end.
fn sexagesimal(c: &mut Cur<'_>) -> bool {
    let mut groups = 0;
    while c.peek() == Some(b':') {
        c.at += 1;
        let rest = &c.v[c.at..];
        match rest {
            [a @ b'0'..=b'5', b @ b'0'..=b'9', ..] => {
                let _ = (a, b);
                c.at += 2;
            }
            [b'0'..=b'9', ..] => c.at += 1,
            _ => return false,
        }
        groups += 1;
    }
    groups > 0
}

fn is_float(v: &[u8]) -> bool {
    // [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    let mut c = Cur::new(v);
    c.sign();
    if c.eat(digit) {
        c.many(digit_);
        if c.eat(|x| x == b'.') {
            c.many(digit_);
            if exponent_end(&mut c) {
                return true;
            }
        }
    }
    // \.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    let mut c = Cur::new(v);
    if c.eat(|x| x == b'.') && c.eat(digit) {
        c.many(digit_);
        if exponent_end(&mut c) {
            return true;
        }
    }
    // [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    let mut c = Cur::new(v);
    c.sign();
    if c.eat(digit) {
        c.many(digit_);
        if sexagesimal(&mut c) && c.eat(|x| x == b'.') {
            c.many(digit_);
            if c.done() {
                return true;
            }
        }
    }
    // [-+]?\.(?:inf|Inf|INF)
    let mut c = Cur::new(v);
    c.sign();
    if c.eat(|x| x == b'.')
        && (c.eat_str(b"inf") || c.eat_str(b"Inf") || c.eat_str(b"INF"))
        && c.done()
    {
        return true;
    }
    // \.(?:nan|NaN|NAN)
    matches!(v, b".nan" | b".NaN" | b".NAN")
}

fn is_int(v: &[u8]) -> bool {
    let body = match v.first() {
        Some(b'-' | b'+') => &v[1..],
        _ => v,
    };
    // 0b[0-1_]+
    if let Some(rest) = body.strip_prefix(b"0b") {
        if !rest.is_empty() && rest.iter().all(|&c| matches!(c, b'0' | b'1' | b'_')) {
            return true;
        }
    }
    // 0[0-7_]+
    if let Some(rest) = body.strip_prefix(b"0") {
        if !rest.is_empty() && rest.iter().all(|&c| matches!(c, b'0'..=b'7' | b'_')) {
            return true;
        }
    }
    // (?:0|[1-9][0-9_]*)
    if body == b"0" {
        return true;
    }
    if let [b'1'..=b'9', rest @ ..] = body {
        if rest.iter().all(|&c| digit_(c)) {
            return true;
        }
    }
    // 0x[0-9a-fA-F_]+
    if let Some(rest) = body.strip_prefix(b"0x") {
        if !rest.is_empty() && rest.iter().all(|&c| c.is_ascii_hexdigit() || c == b'_') {
            return true;
        }
    }
    // [1-9][0-9_]*(?::[0-5]?[0-9])+
    let mut c = Cur::new(body);
    if c.eat(|x| (b'1'..=b'9').contains(&x)) {
        c.many(digit_);
        if sexagesimal(&mut c) && c.done() {
            return true;
        }
    }
    false
}

fn is_timestamp(v: &[u8]) -> bool {
    let mut c = Cur::new(v);
    // [0-9]{4}-[0-9][0-9]-[0-9][0-9]
    let date_only = v.len() == 10
        && v[..4].iter().all(|&x| digit(x))
        && v[4] == b'-'
        && digit(v[5])
        && digit(v[6])
        && v[7] == b'-'
        && digit(v[8])
        && digit(v[9]);
    if date_only {
        return true;
    }
    // [0-9]{4}-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9]
    // (?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?
    for _ in 0..4 {
        if !c.eat(digit) {
            return false;
        }
    }
    let one_or_two = |c: &mut Cur<'_>| {
        let ok = c.eat(digit);
        c.eat(digit);
        ok
    };
    let two = |c: &mut Cur<'_>| c.eat(digit) && c.eat(digit);
    if !(c.eat(|x| x == b'-') && one_or_two(&mut c) && c.eat(|x| x == b'-') && one_or_two(&mut c)) {
        return false;
    }
    if !(c.eat(|x| x == b'T' || x == b't') || c.many(|x| x == b' ' || x == b'\t') > 0) {
        return false;
    }
    if !(one_or_two(&mut c) && c.eat(|x| x == b':') && two(&mut c)) {
        return false;
    }
    if !(c.eat(|x| x == b':') && two(&mut c)) {
        return false;
    }
    if c.eat(|x| x == b'.') {
        c.many(digit);
    }
    if c.done() {
        return true;
    }
    // The time zone: its leading blanks are only allowed when a zone follows.
    c.many(|x| x == b' ' || x == b'\t');
    if c.eat(|x| x == b'Z') {
        return c.done();
    }
    if c.eat(|x| x == b'-' || x == b'+') && one_or_two(&mut c) {
        if c.eat(|x| x == b':') && !two(&mut c) {
            return false;
        }
        return c.done();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyyaml_resolution_table() {
        let cases: &[(&str, Tag)] = &[
            ("", Tag::Null),
            ("~", Tag::Null),
            ("null", Tag::Null),
            ("Null", Tag::Null),
            ("NULL", Tag::Null),
            ("nULL", Tag::Str),
            ("yes", Tag::Bool),
            ("No", Tag::Bool),
            ("ON", Tag::Bool),
            ("oFF", Tag::Str),
            ("y", Tag::Str),
            ("True", Tag::Bool),
            ("0", Tag::Int),
            ("-0", Tag::Int),
            ("017", Tag::Int),
            ("08", Tag::Str),
            ("0b101", Tag::Int),
            ("0b", Tag::Str),
            ("0x1F", Tag::Int),
            ("0x", Tag::Str),
            ("0o17", Tag::Str),
            ("1_000", Tag::Int),
            ("1:30", Tag::Int),
            ("190:20:30", Tag::Int),
            ("0:30", Tag::Str),
            ("1:60", Tag::Str),
            ("1:5", Tag::Int),
            ("1.5", Tag::Float),
            ("1.", Tag::Float),
            (".5", Tag::Float),
            ("1e5", Tag::Str),
            ("1.0e+5", Tag::Float),
            ("1.0e5", Tag::Str),
            ("190:20:30.15", Tag::Float),
            ("-.inf", Tag::Float),
            (".NaN", Tag::Float),
            ("+.nan", Tag::Str),
            ("._", Tag::Str),
            ("2001-12-14", Tag::Timestamp),
            ("2001-12-14t21:59:43.10-05:00", Tag::Timestamp),
            ("2001-12-14 21:59:43.10 -5", Tag::Timestamp),
            ("2001-1-4 1:59:43", Tag::Timestamp),
            ("2001-12-14 21:59:43 ", Tag::Str),
            ("2001-12-14 21:59", Tag::Str),
            ("<<", Tag::Merge),
            ("=", Tag::Value),
            ("53", Tag::Int),
            ("53\n", Tag::Int),
            ("\n", Tag::Str),
            ("api.example.com", Tag::Str),
        ];
        for (text, want) in cases {
            assert_eq!(resolve_plain(text), *want, "{text:?}");
        }
    }
}
