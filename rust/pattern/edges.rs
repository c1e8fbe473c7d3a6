//! The trie's literal edges with short labels: an open-addressing table with linear probing,
//! each slot holding the whole edge (parent, child, the child's `*` child, label words) in 32
//! bytes, so a probe reads one slot (two per cache line) instead of a control byte group and
//! then a bucket elsewhere.

use super::labels::ShortKey;

/// A literal edge whose label is inline, found by the child's path hash. `child` 0 marks an
/// empty slot (node 0, the root, is nobody's child).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
pub(super) struct ShortEdge {
    pub parent: u32,
    /// The child node, with its kinds in the top bits (see the trie) so a step needs no other
    /// load; never 0 in a used slot.
    pub child: u32,
    /// The child's child along a lone `*`, with its kinds in the top bits, or 0: the common
    /// `*.example.com` then costs a lookup no load at all.
    pub star: u32,
    /// Label bytes 16 to 18 and, in the top byte, the length (see [`ShortEdge::new`]).
    tail: u32,
    /// Label bytes 0 to 15.
    head: [u64; 2],
}

/// A [`ShortKey`]'s third word in 32 bits: its label bytes 16 to 18 (a label here has at most
/// [`super::SHORT_LABEL`] = 19 bytes, so byte 19 and up are zero) and the length in its top byte.
fn tail(key: &ShortKey) -> u32 {
    (key[2] as u32) | ((key[2] >> 32) as u32)
}

impl ShortEdge {
    pub fn new(parent: u32, child: u32, label: &ShortKey) -> Self {
        ShortEdge {
            parent,
            child,
            star: 0,
            tail: tail(label),
            head: [label[0], label[1]],
        }
    }

    fn is(&self, parent: u32, label: &ShortKey) -> bool {
        self.parent == parent && self.head == [label[0], label[1]] && self.tail == tail(label)
    }
}

/// Slots are at most this full (in eighths): a probe for an absent edge then scans ~2.5 slots
/// on average, about one cache line.
const MAX_LOAD_EIGHTHS: usize = 5;

#[derive(Debug, Default)]
pub(super) struct ShortEdges {
    slots: Vec<ShortEdge>,
    len: usize,
}

impl ShortEdges {
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Where the probe for `hash` starts.
    fn home(&self, hash: u64) -> usize {
        // `chain` mixes fully, so any bits do; the high ones are taken so that a test can make
        // edges collide on purpose without touching the low ones.
        (hash >> 32) as usize & self.mask()
    }

    /// The edge from `parent` along `label`, whose child's path hash is `hash`.
    #[inline]
    pub fn find(&self, hash: u64, parent: u32, label: &ShortKey) -> Option<&ShortEdge> {
        self.position(hash, parent, label).map(|i| &self.slots[i])
    }

    pub fn find_mut(&mut self, hash: u64, parent: u32, label: &ShortKey) -> Option<&mut ShortEdge> {
        self.position(hash, parent, label)
            .map(|i| &mut self.slots[i])
    }

    #[inline]
    fn position(&self, hash: u64, parent: u32, label: &ShortKey) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let e = self.slots.get(i)?;
            if e.child == 0 {
                return None;
            }
            if e.is(parent, label) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds an edge known to be absent; `rehash` gives the path hash of an edge already in.
    pub fn insert_unique(
        &mut self,
        hash: u64,
        edge: ShortEdge,
        rehash: impl Fn(&ShortEdge) -> u64,
    ) {
        debug_assert!(edge.child != 0);
        if (self.len + 1) * 8 > self.slots.len() * MAX_LOAD_EIGHTHS {
            self.grow(&rehash);
        }
        self.place(hash, edge);
        self.len += 1;
    }

    fn place(&mut self, hash: u64, edge: ShortEdge) {
        let mask = self.mask();
        let mut i = self.home(hash);
        while self.slots[i].child != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = edge;
    }

    fn grow(&mut self, rehash: &impl Fn(&ShortEdge) -> u64) {
        let size = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![ShortEdge::default(); size]);
        for e in old.into_iter().filter(|e| e.child != 0) {
            self.place(rehash(&e), e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> ShortKey {
        [
            n,
            n.rotate_left(17),
            0x1300_0000_0000_0000 | (n & 0xff_ffff),
        ]
    }

    #[test]
    fn finds_what_was_put_and_nothing_else_across_growth() {
        let mut t = ShortEdges::default();
        // A weak hash on purpose: many edges share a home slot, so probing and growth are
        // exercised (the trie's path hashes spread far better).
        let h = |parent: u32| u64::from(parent % 7) << 32;
        for p in 1..2000u32 {
            let e = ShortEdge::new(p, p + 1, &key(u64::from(p)));
            t.insert_unique(h(p), e, |e| h(e.parent));
        }
        for p in 1..2000u32 {
            let e = t.find(h(p), p, &key(u64::from(p))).expect("present");
            assert_eq!(e.child, p + 1);
            assert!(t.find(h(p), p, &key(u64::from(p) + 1)).is_none());
            assert!(t.find(h(p), p + 5000, &key(u64::from(p))).is_none());
        }
        t.find_mut(h(9), 9, &key(9)).expect("present").child = 77;
        assert_eq!(t.find(h(9), 9, &key(9)).map(|e| e.child), Some(77));
        assert!(t.len * 8 <= t.slots.len() * MAX_LOAD_EIGHTHS);
    }

    #[test]
    fn empty_table_finds_nothing() {
        let t = ShortEdges::default();
        assert!(t.find(0, 0, &key(1)).is_none());
    }
}
