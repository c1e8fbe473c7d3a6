//! The suffix trie: patterns stored root-first, one node per label position.
//!
//! Literal labels are edges in one global hash table, so a lookup step is one hash probe
//! whatever the number of patterns. An edge is found by its child's *path hash*: the parent's
//! path hash mixed with the label. A lookup computes these from the name alone, so the probes of
//! successive levels do not wait on each other (each slot still checks its parent and label).
//! Labels of up to 19 bytes (nearly all) sit inside the slots with the child's kinds of entries
//! and the child's `*` child, so a step reads nothing else; longer labels go to a second,
//! ordinary map.
//!
//! A label that is a lone `*` leads to its node's `*` child, kept in the node and in the slot
//! of the edge leading to the node. Other labels with `*` are edges in a third table keyed by a
//! hash of (parent node, literal prefix before the first `*`, literal suffix after the last
//! one); each node lists the distinct (prefix length, suffix length) shapes of its wildcard
//! edges, most used first, so a lookup probes once per shape, not once per pattern, and checks
//! each candidate it finds in full. A leading `**.` marks its node
//! "deep" (matches when one or more labels remain); patterns made only of stars sit outside the
//! trie and match all.

use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::{DefaultHashBuilder, Equivalent, HashMap, HashTable};

use super::edges::{ShortEdge, ShortEdges};
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
/// levels do not wait for each other's results (only the parent check after each does). The
/// label's own mix does not depend on the parent, so one multiply per level is all that chains.
fn chain(seeds: &[u64; 4], parent_hash: u64, label: &ShortKey) -> u64 {
    let own = folded_multiply(label[0] ^ seeds[0], label[1] ^ seeds[1])
        ^ folded_multiply(label[2] ^ seeds[2], seeds[3]);
    folded_multiply(parent_hash ^ own, seeds[1] | 1)
}

/// [`ShortEdge::child`] holds the child's [`Node`] kinds in its top bits.
const KINDS_SHIFT: u32 = 27;
const NODE_MASK: u32 = (1 << KINDS_SHIFT) - 1;

/// [`Node`] holds ids in `exact`.
const HAS_EXACT: u8 = 1;
/// [`Node`] holds ids in `deep`.
const HAS_DEEP: u8 = 2;
/// [`Node`] has wildcard edges other than a lone `*` (`glob_shapes`).
const HAS_GLOB: u8 = 4;
/// [`Node`] has literal edges: without, a lookup skips the probe for one.
const HAS_LITERAL: u8 = 8;
/// [`Node`] has a child along a lone `*`.
const HAS_STAR: u8 = 16;

/// What a lone `*` label is mixed into a path hash as (see [`chain`]): no literal label has
/// this key (theirs carry a length of at least 1 in the top byte).
const STAR_KEY: ShortKey = [b'*' as u64, 0, 0];

/// The short edge that leads to a node, whose slot mirrors the node's kinds: as the edge's
/// child, or as that child's `*` child.
#[derive(Debug, Clone, Copy)]
enum Incoming {
    None,
    /// The edge from this parent along this label.
    Edge(u32, ShortKey),
    /// The `*` child of the child of that edge.
    StarOf(u32, ShortKey),
}

#[derive(Debug, Default)]
struct Node {
    /// Rule ids of patterns that end exactly here.
    exact: Vec<u32>,
    /// Rule ids of `**.` patterns whose fixed part ends here: match when labels remain.
    deep: Vec<u32>,
    /// The child for a label that is a lone `*` (the common `*.example.com`). Its copy in the
    /// slot of the short edge leading here (if one does) spares a lookup this load.
    star: Option<u32>,
    /// Whether any literal edge leaves this node.
    literal: bool,
    /// Distinct (literal prefix length, literal suffix length) of the other wildcard labels
    /// below, with how many edges have each: most edges first, so a lookup that stops at the
    /// first match (`matches`) most often probes one shape.
    glob_shapes: Vec<(u8, u8, u32)>,
}

/// A wildcard edge: its label (a glob), the lengths of its literal prefix and suffix (before
/// the first and after the last `*`), and the node it leads to.
#[derive(Debug)]
struct GlobEdge {
    glob: Box<[u8]>,
    prefix: u8,
    suffix: u8,
    child: u32,
}

impl GlobEdge {
    /// Whether the glob matches `label`: the literal ends compared as slices, [`glob_match`] for
    /// the part from the first to the last `*` only.
    fn matches(&self, label: &[u8]) -> bool {
        let (g, p, s) = (
            &*self.glob,
            usize::from(self.prefix),
            usize::from(self.suffix),
        );
        label.len() >= p + s
            && g[..p] == label[..p]
            && g[g.len() - s..] == label[label.len() - s..]
            && glob_match(&g[p..g.len() - s], &label[p..label.len() - s])
    }
}

/// Wildcard edges whose (parent, prefix, suffix) hash to `key` (see [`PatternTrie::glob_key`]),
/// the first inline (nearly always the only one: one load fewer). Distinct prefixes and
/// suffixes sharing a key only share a list: a lookup checks each edge's own shape.
#[derive(Debug)]
struct GlobSlot {
    key: u64,
    first: GlobEdge,
    more: Vec<GlobEdge>,
}

impl GlobSlot {
    fn edges(&self) -> impl Iterator<Item = &GlobEdge> {
        std::iter::once(&self.first).chain(&self.more)
    }
}

/// A byte slice of any length hashed eight bytes at a time (the slices here are labels: at most
/// 63 bytes). Its length goes in first, so slices differing only in trailing zeros differ.
fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = folded_multiply(seed ^ bytes.len() as u64, 0x9e37_79b9_7f4a_7c15);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = <[u8; 8]>::try_from(c).map_or(0, u64::from_le_bytes);
        h = folded_multiply(h ^ w, 0xbf58_476d_1ce4_e5b9);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let w = rest
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        h = folded_multiply(h ^ w, 0x94d0_49bb_1331_11eb);
    }
    h
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

/// Where a lookup stands: a node, its kinds and path hash, and its `*` child with that child's
/// kinds when the slot that led here told (0: look in the node).
#[derive(Debug, Clone, Copy)]
struct Step {
    node: u32,
    kinds: u8,
    hash: u64,
    star: u32,
}

/// A compiled set of matchName / matchPattern entries, each carrying a rule id.
#[derive(Debug)]
pub struct PatternTrie {
    nodes: Vec<Node>,
    /// Per node, which of [`HAS_EXACT`], [`HAS_DEEP`], [`HAS_GLOB`], [`HAS_LITERAL`], [`HAS_STAR`]
    /// it has.
    kinds: Vec<u8>,
    /// Per node, its path hash (see [`chain`]).
    path_hash: Vec<u64>,
    /// Literal edges with labels of up to [`SHORT_LABEL`] bytes, by the child's path hash.
    short: ShortEdges,
    /// Per-trie random seeds of [`chain`].
    seeds: [u64; 4],
    /// Literal edges with longer labels.
    edges: HashMap<EdgeKey, u32>,
    /// Wildcard edges other than a lone `*`, by [`PatternTrie::glob_key`].
    globs: HashTable<GlobSlot>,
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
            short: ShortEdges::default(),
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
            globs: HashTable::new(),
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
            .expect("fewer than 2^27 trie nodes");
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
            .find(self.short_hash(parent, key), parent, key)
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
                self.short
                    .insert_unique(hash, ShortEdge::new(parent, child, &key), |e| {
                        path_hash[(e.child & NODE_MASK) as usize]
                    });
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

    /// Recomputes a node's bits in `kinds` after it changed, and their copy in the slot of the
    /// short edge leading to it, if any.
    fn refresh_kinds(&mut self, node: u32, incoming: Incoming) {
        let n = &self.nodes[node as usize];
        let mut k = 0;
        if !n.exact.is_empty() {
            k |= HAS_EXACT;
        }
        if !n.deep.is_empty() {
            k |= HAS_DEEP;
        }
        if !n.glob_shapes.is_empty() {
            k |= HAS_GLOB;
        }
        if n.star.is_some() {
            k |= HAS_STAR;
        }
        if n.literal {
            k |= HAS_LITERAL;
        }
        self.kinds[node as usize] = k;
        let (parent, key, as_star) = match incoming {
            Incoming::None => return,
            Incoming::Edge(parent, key) => (parent, key, false),
            Incoming::StarOf(parent, key) => (parent, key, true),
        };
        let hash = self.short_hash(parent, &key);
        if let Some(e) = self.short.find_mut(hash, parent, &key) {
            let with_kinds = node | (u32::from(k) << KINDS_SHIFT);
            if as_star {
                e.star = with_kinds;
            } else {
                e.child = with_kinds;
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
        let mut incoming = Incoming::None;
        for label in pattern.labels.iter().rev() {
            match label {
                LabelPat::Exact(l) => {
                    let child = self.literal_child_or_new(node, l);
                    if !self.nodes[node as usize].literal {
                        self.nodes[node as usize].literal = true;
                        self.refresh_kinds(node, incoming);
                    }
                    incoming = short_key(l).map_or(Incoming::None, |k| Incoming::Edge(node, k));
                    node = child;
                }
                LabelPat::Glob(g) => {
                    let child = self.glob_child(node, g);
                    self.refresh_kinds(node, incoming);
                    incoming = match incoming {
                        Incoming::Edge(parent, key) if **g == *b"*" => {
                            Incoming::StarOf(parent, key)
                        }
                        _ => Incoming::None,
                    };
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
            let child = self.new_node_hashed(self.short_hash(node, &STAR_KEY));
            self.nodes[node as usize].star = Some(child);
            return child;
        }
        let (prefix, suffix) = glob_shape(glob);
        let key = self.glob_key(node, prefix, suffix);
        if let Some(slot) = self.glob_slot(key) {
            if let Some(e) = slot.edges().find(|e| *e.glob == *glob) {
                return e.child;
            }
        }
        let (p, s) = (prefix.len() as u8, suffix.len() as u8);
        let shapes = &mut self.nodes[node as usize].glob_shapes;
        let mut at = match shapes.iter().position(|&(sp, ss, _)| (sp, ss) == (p, s)) {
            Some(at) => at,
            None => {
                shapes.push((p, s, 0));
                shapes.len() - 1
            }
        };
        shapes[at].2 += 1;
        while at > 0 && shapes[at - 1].2 < shapes[at].2 {
            shapes.swap(at - 1, at);
            at -= 1;
        }
        let child = self.new_node();
        let edge = GlobEdge {
            glob: glob.into(),
            prefix: p,
            suffix: s,
            child,
        };
        match self.globs.find_mut(key, |e| e.key == key) {
            Some(slot) => slot.more.push(edge),
            None => {
                self.globs.insert_unique(
                    key,
                    GlobSlot {
                        key,
                        first: edge,
                        more: Vec::new(),
                    },
                    |e| e.key,
                );
            }
        }
        child
    }

    /// The key of wildcard edges: their parent and the literal bytes before the first and after
    /// the last `*`, hashed (keyed by this trie's seeds).
    fn glob_key(&self, node: u32, prefix: &[u8], suffix: &[u8]) -> u64 {
        let p = hash_bytes(self.seeds[0] ^ u64::from(node), prefix);
        folded_multiply(
            p ^ self.seeds[1],
            hash_bytes(self.seeds[2], suffix) ^ self.seeds[3],
        )
    }

    /// The wildcard edges under `key` (see [`PatternTrie::glob_key`]).
    fn glob_slot(&self, key: u64) -> Option<&GlobSlot> {
        self.globs.find(key, |e| e.key == key)
    }

    /// Walks every path the name takes through the trie from `at` over the `remaining` labels,
    /// handing `visit` the ids of each match; stops as soon as `visit` returns true.
    fn walk<N: Labels + ?Sized>(
        &self,
        mut at: Step,
        name: &N,
        mut remaining: usize,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        // Along literal edges this is a loop; it recurses only where wildcards branch off.
        loop {
            if remaining == 0 {
                return at.kinds & HAS_EXACT != 0 && visit(&self.nodes[at.node as usize].exact);
            }
            // `**.` stands for one or more whole labels of `[-a-z0-9_]`.
            if at.kinds & HAS_DEEP != 0
                && name.usual_below(remaining)
                && visit(&self.nodes[at.node as usize].deep)
            {
                return true;
            }
            let i = remaining - 1;
            let literal = if at.kinds & HAS_LITERAL == 0 {
                None
            } else {
                match name.short_key(i) {
                    Some(key) => {
                        let hash = chain(&self.seeds, at.hash, &key);
                        self.short.find(hash, at.node, &key).map(|e| Step {
                            node: e.child & NODE_MASK,
                            kinds: (e.child >> KINDS_SHIFT) as u8,
                            hash,
                            star: e.star,
                        })
                    }
                    None => self
                        .long_child(at.node, name.label(i))
                        .map(|c| self.entry(c)),
                }
            };
            if at.kinds & (HAS_STAR | HAS_GLOB) != 0 && name.usual(i) {
                if let Some(next) = literal {
                    if self.walk(next, name, i, visit) {
                        return true;
                    }
                }
                return self.walk_wild(&at, name, i, visit);
            }
            match literal {
                Some(next) => (at, remaining) = (next, i),
                None => return false,
            }
        }
    }

    /// Where [`PatternTrie::walk`] stands at `node`, from what the node arrays say.
    fn entry(&self, node: u32) -> Step {
        Step {
            node,
            kinds: self.kinds[node as usize],
            hash: self.path_hash[node as usize],
            star: 0,
        }
    }

    /// [`PatternTrie::walk`] from the root.
    fn walk_root<N: Labels + ?Sized>(
        &self,
        name: &N,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        self.walk(self.entry(0), name, name.count(), visit)
    }

    /// The wildcard edges from `at` for label `i` (all `[-a-z0-9_]`).
    fn walk_wild<N: Labels + ?Sized>(
        &self,
        at: &Step,
        name: &N,
        i: usize,
        visit: &mut impl FnMut(&[u32]) -> bool,
    ) -> bool {
        if at.kinds & HAS_STAR != 0 {
            let star = match at.star {
                0 => self.nodes[at.node as usize]
                    .star
                    .map(|c| c | (u32::from(self.kinds[c as usize]) << KINDS_SHIFT)),
                known => Some(known),
            };
            if let Some(c) = star {
                let next = Step {
                    node: c & NODE_MASK,
                    kinds: (c >> KINDS_SHIFT) as u8,
                    hash: chain(&self.seeds, at.hash, &STAR_KEY),
                    star: 0,
                };
                if self.walk(next, name, i, visit) {
                    return true;
                }
            }
        }
        if at.kinds & HAS_GLOB == 0 {
            return false;
        }
        let label = name.label(i);
        for &(p, s, _) in &self.nodes[at.node as usize].glob_shapes {
            let (pl, sl) = (usize::from(p), usize::from(s));
            if pl + sl > label.len() {
                continue;
            }
            let key = self.glob_key(at.node, &label[..pl], &label[label.len() - sl..]);
            let Some(slot) = self.glob_slot(key) else {
                continue;
            };
            // An edge of another shape sharing the key is tried under its own shape.
            for e in slot.edges() {
                if (e.prefix, e.suffix) == (p, s)
                    && e.matches(label)
                    && self.walk(self.entry(e.child), name, i, visit)
                {
                    return true;
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
