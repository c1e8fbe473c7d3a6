//! The suffix trie: patterns stored root-first, one node per label position.
//!
//! Literal labels are edges in one global hash table, so a lookup step is one hash probe
//! whatever the number of patterns. An edge is found by its child's *path hash*: the parent's
//! path hash mixed with the label. A lookup computes these from the name alone, so the probes of
//! successive levels do not wait on each other (each slot still checks its parent and label).
//! Labels of up to 23 bytes (nearly all) sit inside the slots with the child's kinds of entries,
//! so a step reads nothing else; longer labels go to a second, ordinary map.
//!
//! Labels with `*` are edges in a third table keyed by (parent node, literal prefix before the
//! first `*`, literal suffix after the last one); each node lists the distinct (prefix length,
//! suffix length) shapes of its wildcard edges, so a lookup probes once per shape, not once per
//! pattern, and checks the middle of the few candidates it finds. A leading `**.` marks its node
//! "deep" (matches when one or more labels remain); patterns made only of stars sit outside the
//! trie and match all.

use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::{DefaultHashBuilder, Equivalent, HashMap, HashTable};

use super::labels::{is_hostname_byte, short_key, Labels, ShortKey};
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

/// The 64x64 -> 128 bit product folded to 64 bits: a strong, cheap mixing step.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// The path hash of a node's child along a short label: the parent's path hash mixed with the
/// label's words. A lookup computes these from the name alone, so the probes of successive
/// levels do not wait for each other's results (only the parent check after each does).
fn chain(seeds: &[u64; 4], parent_hash: u64, label: &ShortKey) -> u64 {
    let a = folded_multiply(label[0] ^ seeds[0] ^ parent_hash, label[1] ^ seeds[1]);
    let b = folded_multiply(label[2] ^ seeds[2], parent_hash ^ seeds[3]);
    folded_multiply(a ^ seeds[1], b ^ seeds[0])
}

/// [`ShortEdge::child`] holds the child's [`Node`] kinds in its top bits.
const KINDS_SHIFT: u32 = 28;
const NODE_MASK: u32 = (1 << KINDS_SHIFT) - 1;

/// A literal edge whose label is inline, found by the child's path hash.
#[derive(Debug)]
struct ShortEdge {
    parent: u32,
    /// The child node, with its kinds above [`KINDS_SHIFT`] so a step needs no other load.
    child: u32,
    label: ShortKey,
}

/// [`Node`] holds ids in `exact`.
const HAS_EXACT: u8 = 1;
/// [`Node`] holds ids in `deep`.
const HAS_DEEP: u8 = 2;
/// [`Node`] has wildcard edges (`star` or `glob_shapes`).
const HAS_WILD: u8 = 4;

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

/// The key of wildcard edges: their parent and the literal bytes before the first and after the
/// last `*`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct GlobKey {
    parent: u32,
    prefix: Box<[u8]>,
    suffix: Box<[u8]>,
}

/// Borrowed form of [`GlobKey`] (slices of a label being matched); hashes exactly like it.
struct GlobRef<'a> {
    parent: u32,
    prefix: &'a [u8],
    suffix: &'a [u8],
}

impl Hash for GlobRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parent.hash(state);
        self.prefix.hash(state);
        self.suffix.hash(state);
    }
}

impl Equivalent<GlobKey> for GlobRef<'_> {
    fn equivalent(&self, key: &GlobKey) -> bool {
        self.parent == key.parent && *self.prefix == *key.prefix && *self.suffix == *key.suffix
    }
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
    /// Per node, which of [`HAS_EXACT`], [`HAS_DEEP`], [`HAS_WILD`] it has.
    kinds: Vec<u8>,
    /// Per node, its path hash (see [`chain`]).
    path_hash: Vec<u64>,
    /// Literal edges with labels of up to [`SHORT_LABEL`] bytes, by the child's path hash.
    short: HashTable<ShortEdge>,
    /// Per-trie random seeds of [`chain`].
    seeds: [u64; 4],
    /// Literal edges with longer labels.
    edges: HashMap<EdgeKey, u32>,
    globs: HashMap<GlobKey, GlobEdges>,
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
            kinds: vec![0],
            path_hash: vec![0],
            short: HashTable::new(),
            seeds: {
                let h = DefaultHashBuilder::default();
                [
                    h.hash_one(1u8),
                    h.hash_one(2u8),
                    h.hash_one(3u8),
                    h.hash_one(4u8),
                ]
            },
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

    /// A new node with the given path hash.
    fn new_node_hashed(&mut self, path_hash: u64) -> u32 {
        let id = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&id| id <= NODE_MASK)
            .expect("fewer than 2^28 trie nodes");
        self.nodes.push(Node::default());
        self.kinds.push(0);
        self.path_hash.push(path_hash);
        id
    }

    /// A new node reached by a wildcard or long label: any path hash distinct from its siblings'.
    fn new_node(&mut self) -> u32 {
        let id = self.nodes.len() as u64;
        self.new_node_hashed(folded_multiply(id ^ self.seeds[3], self.seeds[2] | 1))
    }

    fn short_hash(&self, parent: u32, label: &ShortKey) -> u64 {
        chain(&self.seeds, self.path_hash[parent as usize], label)
    }

    /// The child of `parent` along the literal label `label`.
    fn literal_child(&self, parent: u32, label: &[u8]) -> Option<u32> {
        match short_key(label) {
            Some(key) => self.short_child(parent, &key),
            None => self.long_child(parent, label),
        }
    }

    fn short_child(&self, parent: u32, key: &ShortKey) -> Option<u32> {
        self.short
            .find(self.short_hash(parent, key), |e| {
                e.parent == parent && e.label == *key
            })
            .map(|e| e.child & NODE_MASK)
    }

    fn long_child(&self, parent: u32, label: &[u8]) -> Option<u32> {
        self.edges.get(&EdgeRef { parent, label }).copied()
    }

    fn literal_child_or_new(&mut self, parent: u32, label: &[u8]) -> u32 {
        if let Some(child) = self.literal_child(parent, label) {
            return child;
        }
        match short_key(label) {
            Some(key) => {
                let hash = self.short_hash(parent, &key);
                let child = self.new_node_hashed(hash);
                let path_hash = &self.path_hash;
                self.short.insert_unique(
                    hash,
                    ShortEdge {
                        parent,
                        child,
                        label: key,
                    },
                    |e| path_hash[(e.child & NODE_MASK) as usize],
                );
                child
            }
            None => {
                let child = self.new_node();
                self.edges.insert(
                    EdgeKey {
                        parent,
                        label: label.into(),
                    },
                    child,
                );
                child
            }
        }
    }

    /// Recomputes a node's bits in `kinds` after it changed, and their copy in the short edge
    /// leading to it (`incoming`: that edge's parent and label), if any.
    fn refresh_kinds(&mut self, node: u32, incoming: Option<(u32, ShortKey)>) {
        let n = &self.nodes[node as usize];
        let mut k = 0;
        if !n.exact.is_empty() {
            k |= HAS_EXACT;
        }
        if !n.deep.is_empty() {
            k |= HAS_DEEP;
        }
        if n.star.is_some() || !n.glob_shapes.is_empty() {
            k |= HAS_WILD;
        }
        self.kinds[node as usize] = k;
        if let Some((parent, key)) = incoming {
            let hash = self.short_hash(parent, &key);
            if let Some(e) = self
                .short
                .find_mut(hash, |e| e.parent == parent && e.label == key)
            {
                e.child = node | (u32::from(k) << KINDS_SHIFT);
            }
        }
    }

    /// Adds a validated pattern or name with its rule id.
    pub fn insert(&mut self, pattern: &Parsed, id: u32) {
        self.entries += 1;
        if pattern.match_all {
            insert_sorted(&mut self.all, id);
            return;
        }
        let mut node = 0u32;
        // The short literal edge that led to `node`, which mirrors its kinds.
        let mut incoming = None;
        for label in pattern.labels.iter().rev() {
            match label {
                LabelPat::Exact(l) => {
                    let child = self.literal_child_or_new(node, l);
                    incoming = short_key(l).map(|k| (node, k));
                    node = child;
                }
                LabelPat::Glob(g) => {
                    let child = self.glob_child(node, g);
                    self.refresh_kinds(node, incoming);
                    incoming = None;
                    node = child;
                }
            }
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
        self.refresh_kinds(node, incoming);
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
        if let Some(edges) = self.glob_edges(node, prefix, suffix) {
            if let Some(&(_, child)) = edges.iter().find(|(g, _)| **g == *glob) {
                return child;
            }
        }
        let child = self.new_node();
        self.globs
            .entry(GlobKey {
                parent: node,
                prefix: prefix.into(),
                suffix: suffix.into(),
            })
            .or_default()
            .push((glob.into(), child));
        child
    }

    /// The wildcard edges of `node` with this literal prefix and suffix.
    fn glob_edges(&self, node: u32, prefix: &[u8], suffix: &[u8]) -> Option<&GlobEdges> {
        self.globs.get(&GlobRef {
            parent: node,
            prefix,
            suffix,
        })
    }

    /// Walks every path the name takes through the trie, handing `visit` the ids of each match;
    /// stops as soon as `visit` returns true.
    /// Walks from `node` (with its path hash and kinds) over the `remaining` labels.
    #[allow(clippy::too_many_arguments)]
    fn walk<N: Labels + ?Sized>(
        &self,
        mut node: u32,
        mut hash: u64,
        mut kinds: u8,
        name: &N,
        mut remaining: usize,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        // Along literal edges this is a loop; it recurses only where wildcards branch off.
        loop {
            if remaining == 0 {
                return kinds & HAS_EXACT != 0 && visit(&self.nodes[node as usize].exact);
            }
            // `**.` stands for one or more whole labels of `[-a-z0-9_]`.
            if kinds & HAS_DEEP != 0
                && name.usual_below(remaining)
                && visit(&self.nodes[node as usize].deep)
            {
                return true;
            }
            let i = remaining - 1;
            let literal = match name.short_key(i) {
                Some(key) => {
                    let child_hash = chain(&self.seeds, hash, &key);
                    self.short
                        .find(child_hash, |e| e.parent == node && e.label == key)
                        .map(|e| {
                            let c = e.child;
                            (c & NODE_MASK, (c >> KINDS_SHIFT) as u8, child_hash)
                        })
                }
                None => self.long_child(node, name.label(i)).map(|c| self.entry(c)),
            };
            if kinds & HAS_WILD != 0 && name.usual(i) {
                if let Some((c, k, h)) = literal {
                    if self.walk(c, h, k, name, i, visit) {
                        return true;
                    }
                }
                return self.walk_wild(node, name, i, visit);
            }
            match literal {
                Some((c, k, h)) => (node, kinds, hash, remaining) = (c, k, h, i),
                None => return false,
            }
        }
    }

    /// A node with its kinds and path hash, as [`PatternTrie::walk`] takes it.
    fn entry(&self, node: u32) -> (u32, u8, u64) {
        (
            node,
            self.kinds[node as usize],
            self.path_hash[node as usize],
        )
    }

    /// [`PatternTrie::walk`] from the root.
    fn walk_root<N: Labels + ?Sized>(
        &self,
        name: &N,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        let (node, kinds, hash) = self.entry(0);
        self.walk(node, hash, kinds, name, name.count(), visit)
    }

    /// The wildcard edges of `node` for label `i` (all `[-a-z0-9_]`).
    fn walk_wild<N: Labels + ?Sized>(
        &self,
        node: u32,
        name: &N,
        i: usize,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        let n = &self.nodes[node as usize];
        if let Some(child) = n.star {
            let (c, k, h) = self.entry(child);
            if self.walk(c, h, k, name, i, visit) {
                return true;
            }
        }
        let label = name.label(i);
        for &(p, s) in &n.glob_shapes {
            let (p, s) = (p as usize, s as usize);
            if p + s > label.len() {
                continue;
            }
            let Some(edges) = self.glob_edges(node, &label[..p], &label[label.len() - s..]) else {
                continue;
            };
            for &(ref glob, child) in edges {
                if glob_match(glob, label) {
                    let (c, k, h) = self.entry(child);
                    if self.walk(c, h, k, name, i, visit) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// True when any entry matches the name.
    pub fn matches<N: Labels + ?Sized>(&self, name: &N) -> bool {
        !self.all.is_empty() || self.walk_root(name, &mut |_| true)
    }

    /// Hands `visit` the rule ids of the entries matching the name, a sorted slice at a time
    /// (one per trie position that matches; an id may come in more than one), until it returns
    /// true; true when it did. Allocates nothing.
    pub fn visit_matching<N: Labels + ?Sized>(
        &self,
        name: &N,
        mut visit: impl FnMut(&[u32]) -> bool,
    ) -> bool {
        (!self.all.is_empty() && visit(&self.all)) || self.walk_root(name, &mut visit)
    }

    /// Sorted, unique rule ids of every entry matching the name.
    pub fn matching<N: Labels + ?Sized>(&self, name: &N) -> Vec<u32> {
        let mut out = self.all.clone();
        self.walk_root(name, &mut |ids| {
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
    use super::super::labels::LabelBuf;
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
