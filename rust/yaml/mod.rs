//! YAML read the way PyYAML's `compose_all` reads it, without a Python object per event.
//!
//! `saphyr-parser` turns the text into events with spans; [`compose`] builds a compact node tree
//! from them with, per node, its kind, its resolved tag (PyYAML's YAML 1.1 implicit resolution,
//! see [`resolve_plain`]), its value, its line and, for a mapping value, the line of its key.
//! Aliases point at the anchored node (shared, as in PyYAML); duplicate keys are kept, in order,
//! so a validator can report them. The first syntax error stops composing; the documents
//! finished before it are still returned (PyYAML's `compose_all` is lazy the same way).

mod resolve;

use std::borrow::Cow;
use std::fmt;

use hashbrown::HashMap;
use saphyr_parser::{Event, Marker, Parser, ScalarStyle, Span};

pub use resolve::resolve_plain;

/// Deeper nesting is refused (PyYAML's recursive composer would hit Python's recursion limit).
pub const MAX_DEPTH: usize = 512;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Scalar,
    Sequence,
    Mapping,
}

/// A node's tag. The standard ones PyYAML resolves are variants; any other is kept as written
/// after handle expansion (`!foo`, `tag:example.com,2000:x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    Str,
    Int,
    Float,
    Bool,
    Null,
    Timestamp,
    Merge,
    Value,
    Yaml,
    Binary,
    Seq,
    Map,
    Omap,
    Pairs,
    Set,
    Other(String),
}

const CORE: &str = "tag:yaml.org,2002:";

impl Tag {
    /// The full tag, as PyYAML names it (`tag:yaml.org,2002:str`, `!foo`).
    pub fn as_str(&self) -> &str {
        match self {
            Tag::Str => "tag:yaml.org,2002:str",
            Tag::Int => "tag:yaml.org,2002:int",
            Tag::Float => "tag:yaml.org,2002:float",
            Tag::Bool => "tag:yaml.org,2002:bool",
            Tag::Null => "tag:yaml.org,2002:null",
            Tag::Timestamp => "tag:yaml.org,2002:timestamp",
            Tag::Merge => "tag:yaml.org,2002:merge",
            Tag::Value => "tag:yaml.org,2002:value",
            Tag::Yaml => "tag:yaml.org,2002:yaml",
            Tag::Binary => "tag:yaml.org,2002:binary",
            Tag::Seq => "tag:yaml.org,2002:seq",
            Tag::Map => "tag:yaml.org,2002:map",
            Tag::Omap => "tag:yaml.org,2002:omap",
            Tag::Pairs => "tag:yaml.org,2002:pairs",
            Tag::Set => "tag:yaml.org,2002:set",
            Tag::Other(s) => s,
        }
    }

    fn from_full(full: String) -> Tag {
        let Some(suffix) = full.strip_prefix(CORE) else {
            return Tag::Other(full);
        };
        match suffix {
            "str" => Tag::Str,
            "int" => Tag::Int,
            "float" => Tag::Float,
            "bool" => Tag::Bool,
            "null" => Tag::Null,
            "timestamp" => Tag::Timestamp,
            "merge" => Tag::Merge,
            "value" => Tag::Value,
            "yaml" => Tag::Yaml,
            "binary" => Tag::Binary,
            "seq" => Tag::Seq,
            "map" => Tag::Map,
            "omap" => Tag::Omap,
            "pairs" => Tag::Pairs,
            "set" => Tag::Set,
            _ => Tag::Other(full),
        }
    }
}

/// One node. Children index [`Tree::nodes`]; a mapping's are key, value, key, value, ...
#[derive(Debug, Clone)]
pub struct Node<'a> {
    pub kind: Kind,
    pub tag: Tag,
    /// The scalar's value (empty for collections).
    pub value: Cow<'a, str>,
    /// 1-based line where the node starts (its anchor or tag, if any, as in PyYAML).
    pub line: u32,
    /// For a mapping value: the 1-based line of its key (the last key, for a node shared by
    /// aliases); 0 otherwise.
    pub key_line: u32,
    pub children: Vec<usize>,
}

/// The documents of a stream, as roots into one node arena.
#[derive(Debug, Default)]
pub struct Tree<'a> {
    pub nodes: Vec<Node<'a>>,
    pub docs: Vec<usize>,
}

/// A YAML syntax error (or a structure PyYAML and Kubernetes refuse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// 1-based.
    pub line: u32,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for YamlError {}

fn line32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// PyYAML's reader refuses these (YAML 1.1's printable set).
fn printable(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='~' | '\u{85}' | '\u{A0}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

fn check_printable(text: &str) -> Result<(), YamlError> {
    if text
        .bytes()
        .all(|b| matches!(b, b'\t' | b'\n' | b'\r' | b' '..=b'~'))
    {
        return Ok(());
    }
    let mut line = 1usize;
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        } else if !printable(c) && c != '\u{FEFF}' {
            return Err(YamlError {
                line: line32(line),
                message: format!(
                    "unacceptable character #x{:04x}: special characters are not allowed",
                    c as u32
                ),
            });
        }
    }
    Ok(())
}

struct Composer<'a> {
    text: &'a str,
    /// Byte offset of each line's start, built on first use.
    line_starts: Vec<usize>,
    /// Where the previous event ended.
    prev_end: Marker,
    tree: Tree<'a>,
    /// Open collections, innermost last.
    stack: Vec<usize>,
    anchors: HashMap<usize, usize>,
    /// Documents completed so far.
    done: usize,
}

impl<'a> Composer<'a> {
    /// The byte offset of a marker. saphyr's `index` mixes bytes and characters on non-ASCII
    /// text, so this goes by line and column (characters from the line start).
    fn offset(&mut self, m: Marker) -> usize {
        if self.line_starts.is_empty() {
            self.line_starts.push(0);
            self.line_starts
                .extend(self.text.match_indices('\n').map(|(i, _)| i + 1));
        }
        let Some(&start) = self.line_starts.get(m.line().saturating_sub(1)) else {
            return self.text.len();
        };
        let line = &self.text[start..];
        start
            + line
                .char_indices()
                .nth(m.col())
                .map_or(line.len(), |(i, _)| i)
    }

    /// PyYAML's line for a node whose first token (anchor, tag, block scalar indicator) comes
    /// before where saphyr's span starts: the first token after the previous event, past blanks,
    /// comments and the indicators `:`, `-`, `?`, `,`, `[`, `{`.
    fn token_line(&mut self, saphyr_line: u32) -> u32 {
        let prev = self.prev_end;
        let from = self.offset(prev);
        let mut line = prev.line();
        let mut comment = false;
        let mut after_blank = true;
        for b in self.text.as_bytes()[from.min(self.text.len())..]
            .iter()
            .copied()
        {
            match b {
                b'\n' => {
                    line += 1;
                    comment = false;
                    after_blank = true;
                    continue;
                }
                _ if comment => continue,
                b'#' if after_blank => comment = true,
                b' ' | b'\t' | b'\r' => after_blank = true,
                b':' | b'-' | b'?' | b',' | b'[' | b'{' => after_blank = false,
                b'&' | b'!' | b'|' | b'>' => return line32(line),
                _ => return saphyr_line,
            }
        }
        saphyr_line
    }

    fn add(&mut self, node: Node<'a>, anchor: usize) -> usize {
        let id = self.tree.nodes.len();
        self.tree.nodes.push(node);
        if anchor != 0 {
            self.anchors.insert(anchor, id);
        }
        id
    }

    fn open(
        &mut self,
        kind: Kind,
        anchor: usize,
        tag: Option<Cow<'_, saphyr_parser::Tag>>,
        line: u32,
    ) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError {
                line,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        let default = if kind == Kind::Mapping {
            Tag::Map
        } else {
            Tag::Seq
        };
        let id = self.add(
            Node {
                kind,
                tag: explicit(tag).unwrap_or(default),
                value: Cow::Borrowed(""),
                line,
                key_line: 0,
                children: Vec::new(),
            },
            anchor,
        );
        self.attach(id);
        self.stack.push(id);
        Ok(())
    }

    /// Puts a node in its parent (or makes it a document root).
    fn attach(&mut self, id: usize) {
        let Some(&parent) = self.stack.last() else {
            self.tree.docs.push(id);
            return;
        };
        let p = &mut self.tree.nodes[parent];
        p.children.push(id);
        if p.kind == Kind::Mapping && p.children.len() % 2 == 0 {
            let key = p.children[p.children.len() - 2];
            let key_line = self.tree.nodes[key].line;
            self.tree.nodes[id].key_line = key_line;
        }
    }
}

/// The tag of a node with an explicit tag, or None when it is absent or non-specific (`!`).
fn explicit(tag: Option<Cow<'_, saphyr_parser::Tag>>) -> Option<Tag> {
    let tag = tag?;
    // saphyr gives `!` as handle "" + suffix "!"; `!foo` as "!" + "foo"; `!!x` with the handle
    // expanded; `!<verbatim>` as "" + the URI.
    if tag.handle.is_empty() && tag.suffix == "!" {
        return None;
    }
    Some(Tag::from_full(format!("{}{}", tag.handle, tag.suffix)))
}

/// Composes every document of `text`. On a syntax error, returns the documents completed before
/// it and the error.
pub fn compose(text: &str) -> (Tree<'_>, Option<YamlError>) {
    let mut c = Composer {
        text,
        line_starts: Vec::new(),
        prev_end: Marker::default(),
        tree: Tree::default(),
        stack: Vec::new(),
        anchors: HashMap::new(),
        done: 0,
    };
    if let Err(e) = check_printable(text) {
        return (c.tree, Some(e));
    }
    let err = compose_into(&mut c, text).err();
    if err.is_some() {
        // Only whole documents count; the one the error interrupted is dropped.
        c.tree.docs.truncate(c.done);
    }
    (c.tree, err)
}

fn compose_into<'a>(c: &mut Composer<'a>, text: &'a str) -> Result<(), YamlError> {
    let mut parser = Parser::new_from_str(text);
    while let Some(next) = parser.next_event() {
        let (event, span): (Event<'a>, Span) = next.map_err(|e| YamlError {
            line: line32(e.marker().line()),
            message: e.info().to_owned(),
        })?;
        let mut line = line32(span.start.line());
        let decorated = match &event {
            Event::Scalar(_, style, anchor, tag) => {
                *anchor != 0
                    || tag.is_some()
                    || matches!(style, ScalarStyle::Literal | ScalarStyle::Folded)
            }
            Event::SequenceStart(anchor, tag) | Event::MappingStart(anchor, tag) => {
                *anchor != 0 || tag.is_some()
            }
            _ => false,
        };
        if decorated {
            line = c.token_line(line);
        }
        let start = span.start;
        // An implicit document start is placed at the document's first token: not a boundary.
        if !matches!(event, Event::DocumentStart(false)) {
            c.prev_end = span.end;
        }
        match event {
            Event::Scalar(value, style, anchor, tag) => {
                let non_specific =
                    matches!(&tag, Some(t) if t.handle.is_empty() && t.suffix == "!");
                let explicit_tag = explicit(tag);
                // saphyr reports an absent value as a plain `~` (with no `~` in the text); PyYAML as ''.
                let value = if style == ScalarStyle::Plain
                    && value == "~"
                    && c.text.as_bytes().get(c.offset(start)) != Some(&b'~')
                {
                    Cow::Borrowed("")
                } else {
                    value
                };
                let tag = match explicit_tag {
                    Some(t) => t,
                    // PyYAML resolves a plain scalar, or any scalar tagged `!`, by its regexes.
                    None if style == ScalarStyle::Plain || non_specific => resolve_plain(&value),
                    None => Tag::Str,
                };
                let id = c.add(
                    Node {
                        kind: Kind::Scalar,
                        tag,
                        value,
                        line,
                        key_line: 0,
                        children: Vec::new(),
                    },
                    anchor,
                );
                c.attach(id);
            }
            Event::SequenceStart(anchor, tag) => c.open(Kind::Sequence, anchor, tag, line)?,
            Event::MappingStart(anchor, tag) => c.open(Kind::Mapping, anchor, tag, line)?,
            Event::SequenceEnd | Event::MappingEnd => {
                c.stack.pop();
            }
            Event::Alias(anchor) => {
                let Some(&id) = c.anchors.get(&anchor) else {
                    return Err(YamlError {
                        line,
                        message: "found undefined alias".to_owned(),
                    });
                };
                if c.stack.contains(&id) {
                    return Err(YamlError {
                        line,
                        message: "found a recursive alias (a node that contains itself)".to_owned(),
                    });
                }
                c.attach(id);
            }
            Event::DocumentEnd => {
                c.done = c.tree.docs.len();
                c.anchors.clear();
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentStart(_) | Event::Nothing => {}
        }
    }
    Ok(())
}
