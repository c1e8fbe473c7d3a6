//! The suffix trie: patterns stored root-first, one node per label position.
//!
//! Literal labels are edges in one global hash table keyed by (parent node, label), so a lookup
//! step is one hash probe whatever the number of patterns. Labels with `*` are edges in a second
//! table keyed by (parent node, literal prefix before the first `*`, literal suffix after the last
//! one); each node lists the distinct (prefix length, suffix length) shapes of its wildcard edges,
//! so a lookup probes once per shape, not once per pattern, and checks the middle of the few
//! candidates it finds. A leading `**.` marks its node "deep" (matches when one or more labels
//! remain); patterns made only of stars sit outside the trie and match all.

use std::hash::{Hash, Hasher};

use hashbrown::{Equivalent, HashMap};

use super::labels::{is_hostname_byte, LabelBuf};
use super::parse::{LabelPat, Parsed};

#[derive(Debug, PartialEq, Eq, Hash)]
struct EdgeKey {
    parent: u32,
    label: Box<[u8]>,
}

/// Borrowed form of [`EdgeKey`] for lookups without allocating; hashes exactly like it.
struct EdgeRef<'a> {
    parent: u32,
    label: &'a [u8],
}

impl Hash for EdgeRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parent.hash(state);
        self.label.hash(state);
    }
}

impl Equivalent<EdgeKey> for EdgeRef<'_> {
    fn equivalent(&self, key: &EdgeKey) -> bool {
        self.parent == key.parent && *self.label == *key.label
    }
}

#[derive(Debug, Default)]
struct Node {
    /// Rule ids of patterns that end exactly here.
    exact: Vec<u32>,
    /// Rule ids of `**.` patterns whose fixed part ends here: match when labels remain.
    deep: Vec<u32>,
    /// The child for a label that is a lone `*` (the common `*.example.com`), kept out of the
    /// glob table so the most frequent wildcard costs no probe.
    star: Option<u32>,
    /// Distinct (literal prefix length, literal suffix length) of the other wildcard labels below.
    glob_shapes: Vec<(u8, u8)>,
}

/// Wildcard edges sharing a parent, prefix and suffix: each full glob and the node it leads to.
type GlobEdges = Vec<(Box<[u8]>, u32)>;

/// Longest glob key: a 63-byte label's prefix and suffix around the `*` separator.
const MAX_GLOB_KEY: usize = 63 + 1 + 63;

/// The key of a wildcard edge: `prefix * suffix`. Stored keys hold exactly one `*`; a probe built
/// from a label only ever reaches here when the label holds no `*` (it is all `[-a-z0-9_]`).
fn glob_key<'a>(buf: &'a mut [u8; MAX_GLOB_KEY], prefix: &[u8], suffix: &[u8]) -> &'a [u8] {
    let n = prefix.len() + 1 + suffix.len();
    buf[..prefix.len()].copy_from_slice(prefix);
    buf[prefix.len()] = b'*';
    buf[prefix.len() + 1..n].copy_from_slice(suffix);
    &buf[..n]
}

/// A glob's shape: the literal bytes before its first and after its last `*`.
fn glob_shape(glob: &[u8]) -> (&[u8], &[u8]) {
    let first = glob.iter().position(|&b| b == b'*').unwrap_or(glob.len());
    let last = glob
        .iter()
        .rposition(|&b| b == b'*')
        .map_or(glob.len(), |i| i + 1);
    (&glob[..first], &glob[last.max(first)..])
}

/// A compiled set of matchName / matchPattern entries, each carrying a rule id.
#[derive(Debug)]
pub struct PatternTrie {
    nodes: Vec<Node>,
    edges: HashMap<EdgeKey, u32>,
    globs: HashMap<EdgeKey, GlobEdges>,
    all: Vec<u32>,
    entries: usize,
}

impl Default for PatternTrie {
    fn default() -> Self {
        Self::new()
    }
}

fn insert_sorted(ids: &mut Vec<u32>, id: u32) {
    if let Err(at) = ids.binary_search(&id) {
        ids.insert(at, id);
    }
}

/// Matches one lower-cased label against a glob label. Pattern literals are all in the star
/// class, so a label byte outside it can only fail; with that, greedy matching with a single
/// backtrack point is exact and linear in practice.
fn glob_match(glob: &[u8], label: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < label.len() {
        if p < glob.len() && glob[p] == b'*' {
            star = Some((p, s));
            p += 1;
        } else if p < glob.len() && glob[p] == label[s] {
            p += 1;
            s += 1;
        } else if let Some((sp, ss)) = star {
            if !is_hostname_byte(label[ss]) {
                return false;
            }
            star = Some((sp, ss + 1));
            p = sp + 1;
            s = ss + 1;
        } else {
            return false;
        }
    }
    glob[p..].iter().all(|&b| b == b'*')
}

impl PatternTrie {
    pub fn new() -> Self {
        PatternTrie {
            nodes: vec![Node::default()],
            edges: HashMap::new(),
            globs: HashMap::new(),
            all: Vec::new(),
            entries: 0,
        }
    }

    /// Number of entries added (each add counts once).
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Number of trie nodes (for memory estimates).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn new_node(&mut self) -> u32 {
        let id = u32::try_from(self.nodes.len()).expect("fewer than 2^32 trie nodes");
        self.nodes.push(Node::default());
        id
    }

    /// Adds a validated pattern or name with its rule id.
    pub fn insert(&mut self, pattern: &Parsed, id: u32) {
        self.entries += 1;
        if pattern.match_all {
            insert_sorted(&mut self.all, id);
            return;
        }
        let mut node = 0u32;
        for label in pattern.labels.iter().rev() {
            node = match label {
                LabelPat::Exact(l) => {
                    let key = EdgeRef {
                        parent: node,
                        label: l,
                    };
                    match self.edges.get(&key) {
                        Some(&child) => child,
                        None => {
                            let child = self.new_node();
                            self.edges.insert(
                                EdgeKey {
                                    parent: node,
                                    label: l.clone(),
                                },
                                child,
                            );
                            child
                        }
                    }
                }
                LabelPat::Glob(g) => self.glob_child(node, g),
            };
        }
        let n = &mut self.nodes[node as usize];
        insert_sorted(
            if pattern.multi {
                &mut n.deep
            } else {
                &mut n.exact
            },
            id,
        );
    }

    fn glob_child(&mut self, node: u32, glob: &[u8]) -> u32 {
        if glob == b"*" {
            if let Some(child) = self.nodes[node as usize].star {
                return child;
            }
            let child = self.new_node();
            self.nodes[node as usize].star = Some(child);
            return child;
        }
        let (prefix, suffix) = glob_shape(glob);
        let shape = (prefix.len() as u8, suffix.len() as u8);
        let shapes = &mut self.nodes[node as usize].glob_shapes;
        if !shapes.contains(&shape) {
            shapes.push(shape);
        }
        let mut buf = [0u8; MAX_GLOB_KEY];
        let key = glob_key(&mut buf, prefix, suffix);
        if let Some(edges) = self.globs.get(&EdgeRef {
            parent: node,
            label: key,
        }) {
            if let Some(&(_, child)) = edges.iter().find(|(g, _)| **g == *glob) {
                return child;
            }
        }
        let child = self.new_node();
        self.globs
            .entry(EdgeKey {
                parent: node,
                label: key.into(),
            })
            .or_default()
            .push((glob.into(), child));
        child
    }

    /// Walks every path the name takes through the trie, handing `visit` the ids of each match;
    /// stops as soon as `visit` returns true.
    fn walk(
        &self,
        node: u32,
        name: &LabelBuf,
        remaining: usize,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        let n = &self.nodes[node as usize];
        if remaining == 0 {
            return !n.exact.is_empty() && visit(&n.exact);
        }
        // `**.` stands for one or more whole labels of `[-a-z0-9_]`.
        if !n.deep.is_empty() && name.usual_below(remaining) && visit(&n.deep) {
            return true;
        }
        let label = name.label(remaining - 1);
        if let Some(&child) = self.edges.get(&EdgeRef {
            parent: node,
            label,
        }) {
            if self.walk(child, name, remaining - 1, visit) {
                return true;
            }
        }
        if (n.star.is_none() && n.glob_shapes.is_empty())
            || !label.iter().all(|&b| is_hostname_byte(b))
        {
            return false;
        }
        if let Some(child) = n.star {
            if self.walk(child, name, remaining - 1, visit) {
                return true;
            }
        }
        let mut buf = [0u8; MAX_GLOB_KEY];
        for &(p, s) in &n.glob_shapes {
            let (p, s) = (p as usize, s as usize);
            if p + s > label.len() {
                continue;
            }
            let key = glob_key(&mut buf, &label[..p], &label[label.len() - s..]);
            let Some(edges) = self.globs.get(&EdgeRef {
                parent: node,
                label: key,
            }) else {
                continue;
            };
            for (glob, child) in edges {
                if glob_match(glob, label) && self.walk(*child, name, remaining - 1, visit) {
                    return true;
                }
            }
        }
        false
    }

    /// True when any entry matches the name.
    pub fn matches(&self, name: &LabelBuf) -> bool {
        !self.all.is_empty() || self.walk(0, name, name.len(), &mut |_| true)
    }

    /// Hands `visit` the rule ids of the entries matching the name, a sorted slice at a time
    /// (one per trie position that matches; an id may come in more than one), until it returns
    /// true; true when it did. Allocates nothing.
    pub fn visit_matching(&self, name: &LabelBuf, mut visit: impl FnMut(&[u32]) -> bool) -> bool {
        (!self.all.is_empty() && visit(&self.all)) || self.walk(0, name, name.len(), &mut visit)
    }

    /// Sorted, unique rule ids of every entry matching the name.
    pub fn matching(&self, name: &LabelBuf) -> Vec<u32> {
        let mut out = self.all.clone();
        self.walk(0, name, name.len(), &mut |ids| {
            out.extend_from_slice(ids);
            false
        });
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::{parse_match_name, parse_match_pattern};
    use super::*;

    fn name(s: &str) -> LabelBuf {
        LabelBuf::from_presentation(s.as_bytes()).expect("valid name")
    }

    fn single(pattern: &str) -> PatternTrie {
        let mut t = PatternTrie::new();
        t.insert(&parse_match_pattern(pattern).expect("valid"), 1);
        t
    }

    #[test]
    fn glob_labels() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "abc", true),
            ("*", "a.b", false),
            ("*", "a\\b", false),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ba", false),
            ("*a", "bca", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "abcbc", true),
            ("a*b*c", "acb", false),
            ("api-*-prod", "api-eu-1-prod", true),
            ("api-*-prod", "api--prod", true),
            ("api-*-prod", "api-prod", false),
            ("*ab", "aab", true),
            ("*x*", "x", true),
            ("*x*", "y", false),
            ("a*", "a!", false),
        ];
        for (g, l, want) in cases {
            assert_eq!(glob_match(g.as_bytes(), l.as_bytes()), *want, "{g} vs {l}");
        }
    }

    #[test]
    fn cilium_semantics() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.example.com", "www.example.com", true),
            ("*.example.com", "WWW.EXAMPLE.COM.", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.b.example.com", false),
            ("*example.com", "example.com", true),
            ("*example.com", "evil-example.com", true),
            ("*example.com", "a.example.com", false),
            ("sub*.example.com", "sub.example.com", true),
            ("sub*.example.com", "sub1.example.com", true),
            ("sub*.example.com", "xsub.example.com", false),
            ("api-*-prod.x", "api-eu-prod.x", true),
            ("**.cilium.io", "a.cilium.io", true),
            ("**.cilium.io", "a.b.cilium.io", true),
            ("**.cilium.io", "cilium.io", false),
            ("**.cilium.io", "acilium.io", false),
            ("***.cilium.io", "a.b.c.cilium.io", true),
            ("a.**.io", "a.b.io", true),
            ("a.**.io", "a.b.c.io", false),
            ("x**y.io", "xabcy.io", true),
            ("**.*.x", "a.b.x", true),
            ("**.*.x", "b.x", false),
            ("*", "anything.at.all", true),
            ("*", ".", true),
            ("**.", "a.b", true),
            ("*.", "a\\.b.c", true),
            ("example.com", "EXAMPLE.com", true),
            ("example.com.", "example.com", true),
            ("example.com", "www.example.com", false),
            // A dot inside a wire label is not a label boundary.
            ("a.b.example.com", "a\\.b.example.com", false),
            ("*.example.com", "a\\.b.example.com", false),
            ("**.example.com", "a\\.b.example.com", false),
            ("**.example.com", "a\\.b.c.example.com", false),
            ("**.example.com", "c.a\\.b.example.com", false),
            ("**.example.com", "a_b.c-d.example.com", true),
            ("a*.example.com", "a\\000.example.com", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(single(p).matches(&name(n)), *want, "{p} vs {n}");
        }
    }

    #[test]
    fn ids_and_sets() {
        let mut t = PatternTrie::new();
        let entries: &[(&str, bool, u32)] = &[
            ("*.example.com", false, 7),
            ("www.example.com", true, 9),
            ("**.example.com", false, 3),
            ("www.example.com", true, 9),
            ("*.com", false, 4),
        ];
        for (text, is_name, id) in entries {
            let p = if *is_name {
                parse_match_name(text)
            } else {
                parse_match_pattern(text)
            };
            t.insert(&p.expect("valid"), *id);
        }
        assert_eq!(t.len(), 5);
        assert_eq!(t.matching(&name("www.example.com")), vec![3, 7, 9]);
        assert_eq!(t.matching(&name("a.b.example.com")), vec![3]);
        assert_eq!(t.matching(&name("example.com")), vec![4]);
        assert_eq!(t.matching(&name("other.org")), Vec::<u32>::new());
        assert!(!t.matches(&name("other.org")));
        t.insert(&parse_match_pattern("*").expect("valid"), 0);
        assert_eq!(t.matching(&name("other.org")), vec![0]);
        assert_eq!(t.matching(&name("www.example.com")), vec![0, 3, 7, 9]);
        // visit_matching sees the same ids (with repeats) and stops when asked.
        let mut seen = Vec::new();
        assert!(!t.visit_matching(&name("www.example.com"), |ids| {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted: {ids:?}");
            seen.extend_from_slice(ids);
            false
        }));
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 3, 7, 9]);
        let mut calls = 0;
        assert!(t.visit_matching(&name("www.example.com"), |_| {
            calls += 1;
            true
        }));
        assert_eq!(calls, 1);
        assert!(!PatternTrie::new().visit_matching(&name("a.com"), |_| true));
    }

    #[test]
    fn many_wildcards_under_one_parent() {
        let mut t = PatternTrie::new();
        for i in 0..2000u32 {
            t.insert(
                &parse_match_pattern(&format!("api-*-prod{i}.x.io")).expect("valid"),
                i,
            );
            t.insert(
                &parse_match_pattern(&format!("w{i}*.x.io")).expect("valid"),
                10_000 + i,
            );
        }
        t.insert(&parse_match_pattern("*.x.io").expect("valid"), 50_000);
        t.insert(&parse_match_pattern("a*b*c.x.io").expect("valid"), 50_001);
        assert_eq!(t.matching(&name("api-eu-prod17.x.io")), vec![17, 50_000]);
        assert_eq!(t.matching(&name("w17.x.io")), vec![10_001, 10_017, 50_000]);
        assert_eq!(
            t.matching(&name("w1777zz.x.io")),
            vec![10_001, 10_017, 10_177, 11_777, 50_000]
        );
        assert_eq!(t.matching(&name("axbyc.x.io")), vec![50_000, 50_001]);
        assert_eq!(t.matching(&name("abc.x.io")), vec![50_000, 50_001]);
        assert_eq!(t.matching(&name("acb.x.io")), vec![50_000]);
        assert_eq!(t.matching(&name("a!b.x.io")), Vec::<u32>::new());
    }

    #[test]
    fn empty_set_matches_nothing() {
        let t = PatternTrie::new();
        assert!(!t.matches(&name("a.com")));
        assert!(!t.matches(&name(".")));
        assert!(t.is_empty());
    }
}
