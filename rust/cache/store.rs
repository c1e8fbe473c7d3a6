//! The cache proper: entries (endpoint, name, ip) -> expiry, the per-(endpoint, ip) pairs a
//! firewall set holds, caps, expiry order and change reporting.
//!
//! Layout (all indices are `u32`, no per-name collection):
//! * `entries`: one [`Entry`] per (endpoint, name, ip), 28 bytes, in a slab with a free list:
//!   its heap position, group and pair, and links on two intrusive doubly linked lists (its
//!   group's and its pair's).
//! * groups: one per (endpoint, name): endpoint, count, list head, 20 bytes; they live with the
//!   names (see [`Names`]), one hash index for both.
//! * pairs: one per (endpoint, ip), with the latest expiry of its entries (what the firewall
//!   element carries); IPv4 pairs take 20 bytes, IPv6 pairs 32; hash-indexed.
//! * The two hash indexes (names, pairs) hold `u32` record numbers. When one is full it is
//!   rebuilt from its records read in memory order, not grown by the table itself, which would
//!   read every record again at random to rehash it; under churn it keeps its size.
//! * `heap`: a 4-ary min-heap with one item per entry, (expiry, stamp, entry), 16 bytes; the
//!   entry's expiry and stamp live there only. Each entry knows its item's position, so an
//!   extension moves the item down in place and a removal takes it out: no stale items.
//!
//! Order: entries are ordered by (expiry, stamp), where the stamp is a counter taken each time an
//! entry's expiry is set. Soonest expiry goes first; among equal expiries, the one set earliest.
//! Both caps evict in that order and `expire` removes in it.

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};

use super::error::CacheError;
use super::names::{self, Names};
use crate::pattern::{LabelBuf, PatternError};

const NIL: u32 = u32::MAX;
/// Children per heap node: a 4-ary heap is half as deep as a binary one and a node's children
/// share a cache line or two, so pushes and pops touch fewer lines.
const ARITY: usize = 4;
/// Top bit of a pair id: set for IPv6 pairs.
const V6: u32 = 1 << 31;

/// Endpoint identifier (Cilium's endpoint ID, or any small integer the caller assigns).
pub type Endpoint = u32;

/// What happened to one (endpoint, ip) firewall element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// Not allowed before, or allowed before and now also under a name it did not have: allowed
    /// until `expires_at` now. (A new name can put the address in more of a firewall's sets,
    /// e.g. those of the `toFQDNs` rules that select that name: program it as new.)
    Added,
    /// Already allowed; now allowed until the later `expires_at`.
    Extended,
    /// No name holds the ip for the endpoint any more; `expires_at` is the expiry it had.
    Removed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Extended => "extended",
            ChangeKind::Removed => "removed",
        }
    }
}

/// One change for the enforcement backend. A mutation reports at most one change per
/// (endpoint, ip): the net effect of the whole call, in the order the pairs were first touched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    pub kind: ChangeKind,
    pub endpoint: Endpoint,
    pub ip: IpAddr,
    pub expires_at: f64,
}

/// The limits a cache is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Every entry lives at least this many seconds (Cilium's `--tofqdns-min-ttl`).
    pub min_ttl: u32,
    /// At most this many IPs per (endpoint, name); the soonest-expiring go first.
    pub max_ips_per_name: u32,
    /// At most this many entries in all; the soonest-expiring go first.
    pub max_entries: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_ttl: 0,
            max_ips_per_name: 1000,
            max_entries: 1_000_000,
        }
    }
}

impl Config {
    /// Checks the limits: both caps at least 1, `max_entries` below 2^31.
    pub fn new(min_ttl: u64, max_ips_per_name: u64, max_entries: u64) -> Result<Self, CacheError> {
        let check = |what, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(CacheError::BadLimit {
                    what,
                    value,
                    min,
                    max,
                })
            } else {
                Ok(value as u32)
            }
        };
        Ok(Config {
            min_ttl: check("min_ttl", min_ttl, 0, u64::from(u32::MAX))?,
            max_ips_per_name: check("max_ips_per_name", max_ips_per_name, 1, u64::from(u32::MAX))?,
            max_entries: check("max_entries", max_entries, 1, u64::from(V6 - 2))?,
        })
    }
}

/// Counters and sizes, for `stats()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub entries: usize,
    pub names: usize,
    pub groups: usize,
    pub pairs: usize,
    pub endpoints: usize,
    pub evictions: u64,
    pub name_evictions: u64,
    pub memory_bytes: usize,
}

/// One entry as [`Cache::visit`] shows it.
#[derive(Debug, Clone, Copy)]
pub struct EntryView<'a> {
    pub endpoint: Endpoint,
    /// Wire form without the root byte, lower-cased (see [`names`]).
    pub name: &'a [u8],
    /// Equal for two entries exactly when their names are, until the epoch
    /// ([`Cache::name_key_epoch`]) changes.
    pub name_key: u32,
    pub ip: IpAddr,
    pub expires: f64,
    /// Orders entries of equal expiry: the one whose expiry was set first comes first.
    pub stamp: u32,
}

/// A batch of answers for one endpoint: names in wire form and their (ip, ttl) lists, flat.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    names: Vec<u8>,
    /// Per answer: end of its name in `names`, end of its addresses in `addrs`.
    ends: Vec<(u32, u32)>,
    addrs: Vec<(IpAddr, u32)>,
}

impl Batch {
    pub fn with_capacity(answers: usize) -> Self {
        Batch {
            names: Vec::with_capacity(answers * 24),
            ends: Vec::with_capacity(answers),
            addrs: Vec::with_capacity(answers),
        }
    }

    /// Adds one answer.
    pub fn push(&mut self, name: &LabelBuf, addrs: &[(IpAddr, u32)]) {
        names::wire_of(name, &mut self.names);
        self.addrs.extend_from_slice(addrs);
        self.ends
            .push((self.names.len() as u32, self.addrs.len() as u32));
    }

    /// Adds the name of one answer; its addresses follow with [`Batch::push_addr`].
    pub fn push_name(&mut self, name: &LabelBuf) {
        names::wire_of(name, &mut self.names);
        self.ends
            .push((self.names.len() as u32, self.addrs.len() as u32));
    }

    /// Adds the name of one answer, given in presentation form; its addresses follow with
    /// [`Batch::push_addr`]. On error nothing is added.
    pub fn push_name_text(&mut self, text: &[u8]) -> Result<(), PatternError> {
        names::wire_from_presentation(text, &mut self.names)?;
        self.ends
            .push((self.names.len() as u32, self.addrs.len() as u32));
        Ok(())
    }

    /// Adds an address to the answer last started with [`Batch::push_name`].
    pub fn push_addr(&mut self, ip: IpAddr, ttl: u32) {
        self.addrs.push((ip, ttl));
        if let Some(last) = self.ends.last_mut() {
            last.1 = self.addrs.len() as u32;
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[(IpAddr, u32)])> {
        let mut start = (0usize, 0usize);
        self.ends.iter().map(move |&(n, a)| {
            let item = (
                &self.names[start.0..n as usize],
                &self.addrs[start.1..a as usize],
            );
            start = (n as usize, a as usize);
            item
        })
    }
}

/// 28 bytes. The entry's expiry and stamp live in its heap item (`heap[pos]`) only.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Index of the entry's item in the heap.
    pos: u32,
    /// `NIL` marks a free slot (then `g_next` links the free list).
    group: u32,
    pair: u32,
    g_next: u32,
    g_prev: u32,
    p_next: u32,
    p_prev: u32,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct PairHdr {
    expires: f64,
    ep: Endpoint,
    /// First entry holding the pair; `NIL` marks a free slot.
    head: u32,
}

#[derive(Debug, Clone, Copy)]
struct PairRec<A> {
    hdr: PairHdr,
    addr: A,
}

#[derive(Debug)]
struct PairTable<A> {
    recs: Vec<PairRec<A>>,
    free: Vec<u32>,
    map: HashTable<u32>,
}

impl<A> Default for PairTable<A> {
    fn default() -> Self {
        PairTable {
            recs: Vec::new(),
            free: Vec::new(),
            map: HashTable::new(),
        }
    }
}

impl<A: Copy + Eq + std::hash::Hash> PairTable<A> {
    fn find(&self, h: &DefaultHashBuilder, ep: Endpoint, addr: A) -> Option<u32> {
        self.find_hashed(h.hash_one((ep, addr)), ep, addr)
    }

    fn find_hashed(&self, hash: u64, ep: Endpoint, addr: A) -> Option<u32> {
        let recs = &self.recs;
        self.map
            .find(hash, |&i| {
                let r = &recs[i as usize];
                r.hdr.ep == ep && r.addr == addr
            })
            .copied()
    }

    /// Finds or creates the pair; true when created (with no entries and expiry -inf).
    fn get_or_insert(&mut self, h: &DefaultHashBuilder, ep: Endpoint, addr: A) -> (u32, bool) {
        let hash = h.hash_one((ep, addr));
        if let Some(i) = self.find_hashed(hash, ep, addr) {
            return (i, false);
        }
        let rec = PairRec {
            hdr: PairHdr {
                expires: f64::NEG_INFINITY,
                ep,
                head: NIL,
            },
            addr,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.recs[i as usize] = rec;
                i
            }
            None => {
                self.recs.push(rec);
                (self.recs.len() - 1) as u32
            }
        };
        if self.map.len() == self.map.capacity() {
            // Read the records in order, not at random as the table's own growth would.
            let recs = &self.recs;
            names::rebuild_index(
                &mut self.map,
                recs.iter()
                    .enumerate()
                    .filter(|&(j, r)| r.hdr.head != NIL || j == i as usize)
                    .map(|(j, r)| (h.hash_one((r.hdr.ep, r.addr)), j as u32)),
                |&j| {
                    let r = &recs[j as usize];
                    h.hash_one((r.hdr.ep, r.addr))
                },
            );
            return (i, true);
        }
        let recs = &self.recs;
        self.map.insert_unique(hash, i, |&j| {
            let r = &recs[j as usize];
            h.hash_one((r.hdr.ep, r.addr))
        });
        (i, true)
    }

    fn remove(&mut self, h: &DefaultHashBuilder, i: u32) {
        let r = self.recs[i as usize];
        if let Ok(slot) = self
            .map
            .find_entry(h.hash_one((r.hdr.ep, r.addr)), |&j| j == i)
        {
            slot.remove();
        }
        self.recs[i as usize].hdr.head = NIL;
        self.free.push(i);
    }

    fn memory(&self) -> usize {
        self.recs.capacity() * std::mem::size_of::<PairRec<A>>()
            + self.free.capacity() * 4
            + self.map.allocation_size()
    }
}

#[derive(Debug, Clone, Copy)]
struct HeapItem {
    expires: f64,
    stamp: u32,
    entry: u32,
}

impl HeapItem {
    fn before(&self, other: &HeapItem) -> bool {
        match self.expires.total_cmp(&other.expires) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => self.stamp < other.stamp,
        }
    }
}

/// One (endpoint, ip) touched by a mutation, with its state before the first touch.
#[derive(Debug, Clone, Copy)]
struct Touch {
    pair: u32,
    ep: Endpoint,
    ip: IpAddr,
    before: Option<f64>,
}

/// Pairs touched by one mutation. A pair is found touched by a bit per pair slot, so the common
/// case costs no hashing; only pairs freed during the call (evicted or expired) go through a set
/// keyed by (endpoint, ip), so that one re-created in the same call keeps its first record.
#[derive(Debug, Default)]
struct Touches {
    list: Vec<Touch>,
    /// Bit `2i` for IPv4 pair `i`, `2i + 1` for IPv6 pair `i`: touched and alive in this call.
    marks: Vec<u64>,
    /// (endpoint, ip) of touched pairs freed during this call.
    freed: HashSet<(Endpoint, IpAddr)>,
    /// Marked pairs that no record names (re-created after being freed), cleared at the end.
    stray: Vec<u32>,
    /// Pairs that existed before this call and gained a name in it.
    renamed: Vec<(Endpoint, IpAddr)>,
    /// Tracking off (snapshot restore reports nothing).
    off: bool,
}

fn mark_bit(p: u32) -> (usize, u64) {
    let b = ((p & !V6) as usize) * 2 + usize::from(p & V6 != 0);
    (b / 64, 1u64 << (b % 64))
}

impl Touches {
    fn touch(&mut self, pair: u32, ep: Endpoint, ip: IpAddr, before: Option<f64>) {
        if self.off {
            return;
        }
        let (w, m) = mark_bit(pair);
        if w >= self.marks.len() {
            self.marks.resize(w + 1, 0);
        }
        if self.marks[w] & m != 0 {
            return;
        }
        self.marks[w] |= m;
        if before.is_none() && !self.freed.is_empty() && self.freed.contains(&(ep, ip)) {
            // Freed and re-created within this call: the first record stands.
            self.stray.push(pair);
            return;
        }
        self.list.push(Touch {
            pair,
            ep,
            ip,
            before,
        });
    }

    /// Pair `pair` of (ep, ip) is being freed (it was touched first).
    fn freeing(&mut self, pair: u32, ep: Endpoint, ip: IpAddr) {
        if self.off {
            return;
        }
        let (w, m) = mark_bit(pair);
        if let Some(word) = self.marks.get_mut(w) {
            if *word & m != 0 {
                *word &= !m;
                self.freed.insert((ep, ip));
            }
        }
    }

    fn clear(&mut self) {
        for t in &self.list {
            let (w, m) = mark_bit(t.pair);
            if let Some(word) = self.marks.get_mut(w) {
                *word &= !m;
            }
        }
        for &p in &self.stray {
            let (w, m) = mark_bit(p);
            if let Some(word) = self.marks.get_mut(w) {
                *word &= !m;
            }
        }
        self.list.clear();
        self.renamed.clear();
        self.list.shrink_to(1 << 16);
        self.stray.clear();
        self.freed.clear();
        self.freed.shrink_to(1 << 12);
    }
}

/// The FQDN -> IP TTL cache. Not synchronised: the binding layer wraps it in a lock.
#[derive(Debug)]
pub struct Cache {
    cfg: Config,
    hasher: DefaultHashBuilder,
    names: Names,
    v4: PairTable<Ipv4Addr>,
    v6: PairTable<Ipv6Addr>,
    entries: Vec<Entry>,
    entry_free: u32,
    heap: Vec<HeapItem>,
    /// Endpoint -> number of its groups.
    endpoints: HashMap<Endpoint, u32>,
    len: usize,
    next_stamp: u32,
    evictions: u64,
    name_evictions: u64,
    /// Kept between calls so its allocations are reused.
    spare_touches: Touches,
}

/// Seconds since the Unix epoch, as `time.time()` gives them.
pub fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn check_now(now: f64) -> Result<f64, CacheError> {
    if now.is_finite() {
        Ok(now)
    } else {
        Err(CacheError::BadTime {
            what: "now",
            value: now.to_string(),
        })
    }
}

/// Parses an address in text form.
pub fn parse_ip(text: &str) -> Result<IpAddr, CacheError> {
    // The policy module's parser: exactly `IpAddr::from_str`, with a short path for IPv4.
    crate::policy::parse_ip(text).ok_or_else(|| CacheError::BadAddress {
        text: text.to_owned(),
    })
}

/// Reads a packed address: 4 bytes for IPv4, 16 for IPv6 (network order, as `inet_pton`).
pub fn parse_packed_ip(bytes: &[u8]) -> Result<IpAddr, CacheError> {
    if let Ok(a) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::from(a))
    } else if let Ok(a) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::from(a))
    } else {
        Err(CacheError::BadPackedAddress { len: bytes.len() })
    }
}

/// Checks a TTL given as a signed integer (as Python passes it).
pub fn check_ttl(ip: IpAddr, ttl: i64) -> Result<u32, CacheError> {
    u32::try_from(ttl).map_err(|_| CacheError::BadTtl {
        ip: ip.to_string(),
        ttl,
    })
}

impl Cache {
    pub fn new(cfg: Config) -> Self {
        Cache {
            cfg,
            hasher: DefaultHashBuilder::default(),
            names: Names::default(),
            v4: PairTable::default(),
            v6: PairTable::default(),
            entries: Vec::new(),
            entry_free: NIL,
            heap: Vec::new(),
            endpoints: HashMap::new(),
            len: 0,
            next_stamp: 0,
            evictions: 0,
            name_evictions: 0,
            spare_touches: Touches::default(),
        }
    }

    fn touches(&mut self) -> Touches {
        std::mem::take(&mut self.spare_touches)
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    /// Number of (endpoint, name, ip) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn stats(&self) -> Stats {
        Stats {
            entries: self.len,
            names: self.names.len(),
            groups: self.names.groups_len(),
            pairs: self.v4.map.len() + self.v6.map.len(),
            endpoints: self.endpoints.len(),
            evictions: self.evictions,
            name_evictions: self.name_evictions,
            memory_bytes: self.memory(),
        }
    }

    /// Bytes held by the cache's own allocations (capacities, not just what is in use).
    pub fn memory(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.names.memory()
            + self.v4.memory()
            + self.v6.memory()
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.heap.capacity() * std::mem::size_of::<HeapItem>()
            + self.endpoints.capacity() * 9
    }

    // ---- pairs ----------------------------------------------------------------------------

    fn hdr(&self, p: u32) -> PairHdr {
        if p & V6 == 0 {
            self.v4.recs[p as usize].hdr
        } else {
            self.v6.recs[(p & !V6) as usize].hdr
        }
    }

    fn hdr_mut(&mut self, p: u32) -> &mut PairHdr {
        if p & V6 == 0 {
            &mut self.v4.recs[p as usize].hdr
        } else {
            &mut self.v6.recs[(p & !V6) as usize].hdr
        }
    }

    fn pair_ip(&self, p: u32) -> IpAddr {
        if p & V6 == 0 {
            IpAddr::V4(self.v4.recs[p as usize].addr)
        } else {
            IpAddr::V6(self.v6.recs[(p & !V6) as usize].addr)
        }
    }

    fn find_pair(&self, ep: Endpoint, ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self.v4.find(&self.hasher, ep, a),
            IpAddr::V6(a) => self.v6.find(&self.hasher, ep, a).map(|i| i | V6),
        }
    }

    fn pair_or_insert(&mut self, ep: Endpoint, ip: IpAddr) -> (u32, bool) {
        match ip {
            IpAddr::V4(a) => self.v4.get_or_insert(&self.hasher, ep, a),
            IpAddr::V6(a) => {
                let (i, new) = self.v6.get_or_insert(&self.hasher, ep, a);
                (i | V6, new)
            }
        }
    }

    fn free_pair(&mut self, p: u32) {
        if p & V6 == 0 {
            self.v4.remove(&self.hasher, p);
        } else {
            self.v6.remove(&self.hasher, p & !V6);
        }
    }

    // ---- groups -----------------------------------------------------------------------------

    fn group_or_insert(&mut self, ep: Endpoint, wire: &[u8]) -> Result<u32, CacheError> {
        let (g, new) = self.names.get_or_insert(&self.hasher, ep, wire)?;
        if new {
            *self.endpoints.entry(ep).or_insert(0) += 1;
        }
        Ok(g)
    }

    fn free_group(&mut self, g: u32) {
        let ep = self.names.groups[g as usize].ep;
        self.names.remove(&self.hasher, g);
        if let Some(n) = self.endpoints.get_mut(&ep) {
            *n -= 1;
            if *n == 0 {
                self.endpoints.remove(&ep);
            }
        }
    }

    /// Still the live group of (ep, wire)? Evictions inside a call can free it.
    fn group_is(&self, g: u32, ep: Endpoint, wire: &[u8]) -> bool {
        self.names.is_live(g)
            && self.names.groups[g as usize].ep == ep
            && self.names.bytes(g) == wire
    }

    // ---- entries and the heap -----------------------------------------------------------------

    fn take_stamp(&mut self) -> u32 {
        if self.next_stamp == u32::MAX {
            self.renumber();
        }
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }

    /// Gives entries stamps 0..n in their current order, leaving the heap sorted (a sorted
    /// array is a heap). Runs once per 2^32 expiry settings.
    fn renumber(&mut self) {
        self.heap
            .sort_unstable_by(|a, b| a.expires.total_cmp(&b.expires).then(a.stamp.cmp(&b.stamp)));
        for (i, item) in self.heap.iter_mut().enumerate() {
            item.stamp = i as u32;
            self.entries[item.entry as usize].pos = i as u32;
        }
        self.next_stamp = self.heap.len() as u32;
    }

    #[cfg(test)]
    pub(crate) fn set_next_stamp(&mut self, s: u32) {
        if s > self.next_stamp {
            self.next_stamp = s;
        }
    }

    /// The heap item (expiry, stamp) of live entry `e`.
    fn item(&self, e: u32) -> HeapItem {
        self.heap[self.entries[e as usize].pos as usize]
    }

    fn heap_place(&mut self, i: usize, item: HeapItem) {
        self.heap[i] = item;
        self.entries[item.entry as usize].pos = i as u32;
    }

    /// Moves `item` from hole `i` towards the root to its place.
    fn sift_up(&mut self, mut i: usize, item: HeapItem) {
        while i > 0 {
            let parent = (i - 1) / ARITY;
            let p = self.heap[parent];
            if item.before(&p) {
                self.heap_place(i, p);
                i = parent;
            } else {
                break;
            }
        }
        self.heap_place(i, item);
    }

    /// Moves `item` from hole `i` towards the leaves to its place.
    fn sift_down(&mut self, mut i: usize, item: HeapItem) {
        let n = self.heap.len();
        loop {
            let first = ARITY * i + 1;
            if first >= n {
                break;
            }
            let mut c = first;
            for k in first + 1..(first + ARITY).min(n) {
                if self.heap[k].before(&self.heap[c]) {
                    c = k;
                }
            }
            let child = self.heap[c];
            if child.before(&item) {
                self.heap_place(i, child);
                i = c;
            } else {
                break;
            }
        }
        self.heap_place(i, item);
    }

    fn heap_insert(&mut self, item: HeapItem) {
        let n = self.heap.len();
        // Most new items sort last (a later expiry, or the same with a later stamp): written
        // once, where they stay, rather than pushed and then placed again by `sift_up`.
        let parent = n.wrapping_sub(1) / ARITY;
        if n == 0 || !item.before(&self.heap[parent]) {
            self.heap.push(item);
            self.entries[item.entry as usize].pos = n as u32;
            return;
        }
        let p = self.heap[parent];
        self.heap.push(p);
        self.entries[p.entry as usize].pos = n as u32;
        self.sift_up(parent, item);
    }

    /// Takes the item at `i` out of the heap.
    fn heap_remove(&mut self, i: usize) {
        let Some(last) = self.heap.pop() else { return };
        if i < self.heap.len() {
            if i > 0 && last.before(&self.heap[(i - 1) / ARITY]) {
                self.sift_up(i, last);
            } else {
                self.sift_down(i, last);
            }
        }
    }

    /// The entry first in (expiry, stamp) order.
    fn peek_min(&self) -> Option<HeapItem> {
        self.heap.first().copied()
    }

    fn alloc_entry(&mut self, e: Entry) -> u32 {
        if self.entry_free != NIL {
            let i = self.entry_free;
            self.entry_free = self.entries[i as usize].g_next;
            self.entries[i as usize] = e;
            i
        } else {
            self.entries.push(e);
            (self.entries.len() - 1) as u32
        }
    }

    /// The entry of group `g` for pair `p`. Walks the group's and the pair's lists in step, so
    /// the cost is set by the shorter (a group holds at most `max_ips_per_name` entries, a pair
    /// one per name that resolved to it).
    fn find_entry(&self, g: u32, p: u32) -> Option<u32> {
        let mut a = self.names.groups[g as usize].head;
        let mut b = self.hdr(p).head;
        while a != NIL && b != NIL {
            let ra = self.entries[a as usize];
            if ra.pair == p {
                return Some(a);
            }
            let rb = self.entries[b as usize];
            if rb.group == g {
                return Some(b);
            }
            a = ra.g_next;
            b = rb.p_next;
        }
        None
    }

    /// Unlinks and frees entry `e`, freeing its group, name and pair when they empty, and
    /// lowering the pair's expiry when `e` held it.
    fn remove_entry(&mut self, e: u32, t: &mut Touches) {
        let r = self.entries[e as usize];
        let removed = self.heap[r.pos as usize];
        self.heap_remove(r.pos as usize);
        // group list
        if r.g_prev != NIL {
            self.entries[r.g_prev as usize].g_next = r.g_next;
        } else {
            self.names.groups[r.group as usize].head = r.g_next;
        }
        if r.g_next != NIL {
            self.entries[r.g_next as usize].g_prev = r.g_prev;
        }
        let g = &mut self.names.groups[r.group as usize];
        g.count -= 1;
        if g.count == 0 {
            self.free_group(r.group);
        }
        // pair list
        if r.p_prev != NIL {
            self.entries[r.p_prev as usize].p_next = r.p_next;
        } else {
            self.hdr_mut(r.pair).head = r.p_next;
        }
        if r.p_next != NIL {
            self.entries[r.p_next as usize].p_prev = r.p_prev;
        }
        let mut h = self.hdr(r.pair);
        if h.head == NIL {
            t.freeing(r.pair, h.ep, self.pair_ip(r.pair));
            self.free_pair(r.pair);
        } else {
            let expires = removed.expires;
            if expires >= h.expires {
                let mut max = f64::NEG_INFINITY;
                let mut i = h.head;
                while i != NIL {
                    let x = self.entries[i as usize];
                    max = max.max(self.heap[x.pos as usize].expires);
                    if max >= expires {
                        break; // another entry holds the same expiry
                    }
                    i = x.p_next;
                }
                h.expires = max;
            }
            *self.hdr_mut(r.pair) = h;
        }
        self.entries[e as usize] = Entry {
            pos: NIL,
            group: NIL,
            pair: NIL,
            g_next: self.entry_free,
            g_prev: NIL,
            p_next: NIL,
            p_prev: NIL,
        };
        self.entry_free = e;
        self.len -= 1;
    }

    fn touch_entry(&self, e: u32, t: &mut Touches) {
        let p = self.entries[e as usize].pair;
        let h = self.hdr(p);
        t.touch(p, h.ep, self.pair_ip(p), Some(h.expires));
    }

    /// Evicts the soonest-expiring entry of group `g`.
    fn evict_from_group(&mut self, g: u32, t: &mut Touches) {
        let mut best = NIL;
        let mut key = (f64::INFINITY, u32::MAX);
        let mut e = self.names.groups[g as usize].head;
        while e != NIL {
            let r = self.entries[e as usize];
            let it = self.heap[r.pos as usize];
            let k = (it.expires, it.stamp);
            if best == NIL
                || k.0.total_cmp(&key.0).then(k.1.cmp(&key.1)) == std::cmp::Ordering::Less
            {
                best = e;
                key = k;
            }
            e = r.g_next;
        }
        if best != NIL {
            self.touch_entry(best, t);
            self.remove_entry(best, t);
            self.name_evictions += 1;
        }
    }

    /// Records one (ip, expiry) for group `g`, then applies both caps.
    fn insert(&mut self, g: u32, ip: IpAddr, expires: f64, t: &mut Touches) {
        let ep = self.names.groups[g as usize].ep;
        let (p, new_pair) = self.pair_or_insert(ep, ip);
        let before = if new_pair {
            None
        } else {
            Some(self.hdr(p).expires)
        };
        t.touch(p, ep, ip, before);
        if !new_pair {
            if let Some(e) = self.find_entry(g, p) {
                if expires > self.item(e).expires {
                    let stamp = self.take_stamp();
                    let h = self.hdr_mut(p);
                    if expires > h.expires {
                        h.expires = expires;
                    }
                    // A later key: the item can only move towards the leaves.
                    let pos = self.entries[e as usize].pos as usize;
                    self.sift_down(
                        pos,
                        HeapItem {
                            expires,
                            stamp,
                            entry: e,
                        },
                    );
                }
                return;
            }
            if !t.off {
                t.renamed.push((ep, ip));
            }
        }
        let stamp = self.take_stamp();
        let gr = self.names.groups[g as usize];
        let h = self.hdr(p);
        let e = self.alloc_entry(Entry {
            pos: NIL,
            group: g,
            pair: p,
            g_next: gr.head,
            g_prev: NIL,
            p_next: h.head,
            p_prev: NIL,
        });
        if gr.head != NIL {
            self.entries[gr.head as usize].g_prev = e;
        }
        if h.head != NIL {
            self.entries[h.head as usize].p_prev = e;
        }
        let gm = &mut self.names.groups[g as usize];
        gm.head = e;
        gm.count += 1;
        let group_count = gm.count;
        let hm = self.hdr_mut(p);
        hm.head = e;
        if expires > hm.expires {
            hm.expires = expires;
        }
        self.len += 1;
        self.heap_insert(HeapItem {
            expires,
            stamp,
            entry: e,
        });
        if group_count > self.cfg.max_ips_per_name {
            self.evict_from_group(g, t);
        }
        while self.len > self.cfg.max_entries as usize {
            let Some(top) = self.peek_min() else { break };
            self.touch_entry(top.entry, t);
            self.remove_entry(top.entry, t);
            self.evictions += 1;
        }
    }

    fn expiry(&self, now: f64, ttl: u32) -> Result<f64, CacheError> {
        let x = now + f64::from(ttl.max(self.cfg.min_ttl));
        if x.is_finite() {
            Ok(x)
        } else {
            Err(CacheError::BadTime {
                what: "now + ttl",
                value: x.to_string(),
            })
        }
    }

    fn record_one(
        &mut self,
        ep: Endpoint,
        wire: &[u8],
        addrs: &[(IpAddr, u32)],
        now: f64,
        t: &mut Touches,
    ) -> Result<(), CacheError> {
        let mut g = NIL;
        for &(ip, ttl) in addrs {
            let expires = self.expiry(now, ttl)?;
            if g == NIL || !self.group_is(g, ep, wire) {
                g = self.group_or_insert(ep, wire)?;
            }
            self.insert(g, ip, expires, t);
        }
        Ok(())
    }

    fn finish(&mut self, mut t: Touches) -> Vec<Change> {
        let mut out = Vec::with_capacity(t.list.len());
        for x in &t.list {
            let after = if !t.freed.is_empty() && t.freed.contains(&(x.ep, x.ip)) {
                self.find_pair(x.ep, x.ip).map(|p| self.hdr(p).expires)
            } else {
                // Never freed during the call, so still the same live pair.
                Some(self.hdr(x.pair).expires)
            };
            let renamed = !t.renamed.is_empty() && t.renamed.contains(&(x.ep, x.ip));
            let change = match (x.before, after) {
                (None, Some(a)) => Some((ChangeKind::Added, a)),
                (Some(_), Some(a)) if renamed => Some((ChangeKind::Added, a)),
                (Some(b), Some(a)) if a > b => Some((ChangeKind::Extended, a)),
                (Some(b), None) => Some((ChangeKind::Removed, b)),
                _ => None,
            };
            if let Some((kind, expires_at)) = change {
                out.push(Change {
                    kind,
                    endpoint: x.ep,
                    ip: x.ip,
                    expires_at,
                });
            }
        }
        t.clear();
        self.spare_touches = t;
        out
    }

    /// Records the answer `addrs` for `name` as seen by `endpoint` at `now`.
    pub fn record(
        &mut self,
        endpoint: Endpoint,
        name: &LabelBuf,
        addrs: &[(IpAddr, u32)],
        now: f64,
    ) -> Result<Vec<Change>, CacheError> {
        let mut wire = Vec::with_capacity(name.wire_len());
        names::wire_of(name, &mut wire);
        self.record_wire(endpoint, &wire, addrs, now)
    }

    /// [`Cache::record`] with the name already in wire form, as [`names::wire_of`] or
    /// [`names::wire_from_presentation`] write it.
    pub(crate) fn record_wire(
        &mut self,
        endpoint: Endpoint,
        wire: &[u8],
        addrs: &[(IpAddr, u32)],
        now: f64,
    ) -> Result<Vec<Change>, CacheError> {
        debug_assert!(names::is_valid_wire(wire));
        let now = check_now(now)?;
        for &(_, ttl) in addrs {
            self.expiry(now, ttl)?;
        }
        let mut t = self.touches();
        self.record_one(endpoint, wire, addrs, now, &mut t)?;
        Ok(self.finish(t))
    }

    /// Records every answer of `batch` for `endpoint`; the changes are the net effect.
    pub fn record_batch(
        &mut self,
        endpoint: Endpoint,
        batch: &Batch,
        now: f64,
    ) -> Result<Vec<Change>, CacheError> {
        let now = check_now(now)?;
        for &(_, ttl) in &batch.addrs {
            self.expiry(now, ttl)?;
        }
        let mut t = self.touches();
        for (wire, addrs) in batch.iter() {
            self.record_one(endpoint, wire, addrs, now, &mut t)?;
        }
        Ok(self.finish(t))
    }

    /// Removes every entry with expiry <= `now`; cost proportional to what is removed.
    pub fn expire(&mut self, now: f64) -> Result<Vec<Change>, CacheError> {
        let now = check_now(now)?;
        let mut t = self.touches();
        while let Some(top) = self.peek_min() {
            if top.expires > now {
                break;
            }
            self.touch_entry(top.entry, &mut t);
            self.remove_entry(top.entry, &mut t);
        }
        Ok(self.finish(t))
    }

    /// Removes every entry of `endpoint` (a pod that is gone: its id is never used again, so
    /// nothing it learned may outlive it); returns the removals. One pass over the live entries.
    pub fn forget(&mut self, endpoint: Endpoint) -> Vec<Change> {
        if !self.endpoints.contains_key(&endpoint) {
            return Vec::new();
        }
        let doomed: Vec<u32> = self
            .heap
            .iter()
            .map(|it| it.entry)
            .filter(|&e| {
                let g = self.entries[e as usize].group;
                self.names.groups[g as usize].ep == endpoint
            })
            .collect();
        let mut t = self.touches();
        for e in doomed {
            self.touch_entry(e, &mut t);
            self.remove_entry(e, &mut t);
        }
        self.finish(t)
    }

    /// True when `endpoint` may reach `ip` at `now`: some name holds it and it has not expired.
    pub fn allowed(&self, endpoint: Endpoint, ip: IpAddr, now: f64) -> bool {
        self.find_pair(endpoint, ip)
            .is_some_and(|p| self.hdr(p).expires > now)
    }

    /// The latest expiry of (endpoint, ip), when some name holds it.
    pub fn pair_expiry(&self, endpoint: Endpoint, ip: IpAddr) -> Option<f64> {
        self.find_pair(endpoint, ip).map(|p| self.hdr(p).expires)
    }

    fn endpoints_sorted(&self, endpoint: Option<Endpoint>) -> Vec<Endpoint> {
        match endpoint {
            Some(ep) => vec![ep],
            None => {
                let mut v: Vec<Endpoint> = self.endpoints.keys().copied().collect();
                v.sort_unstable();
                v
            }
        }
    }

    /// IPs held for `name` (by `endpoint`, or by any when None) with their latest expiry,
    /// sorted by address (IPv4 first).
    pub fn lookup(&self, name: &LabelBuf, endpoint: Option<Endpoint>) -> Vec<(IpAddr, f64)> {
        let mut wire = Vec::with_capacity(name.wire_len());
        names::wire_of(name, &mut wire);
        let mut out: Vec<(IpAddr, f64)> = Vec::new();
        for g in self.names.chain(&self.hasher, &wire) {
            let gr = self.names.groups[g as usize];
            if endpoint.is_some_and(|ep| ep != gr.ep) {
                continue;
            }
            let mut e = gr.head;
            while e != NIL {
                let r = self.entries[e as usize];
                out.push((self.pair_ip(r.pair), self.heap[r.pos as usize].expires));
                e = r.g_next;
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        out.dedup_by(|later, first| later.0 == first.0);
        out
    }

    /// Names (presentation form, sorted, unique) under which `ip` was learned by `endpoint`,
    /// or by any endpoint when None.
    pub fn names_for(&self, ip: IpAddr, endpoint: Option<Endpoint>) -> Vec<String> {
        // (name key, group): one group per name is enough to read the name.
        let mut ids: Vec<(u32, u32)> = Vec::new();
        for ep in self.endpoints_sorted(endpoint) {
            let Some(p) = self.find_pair(ep, ip) else {
                continue;
            };
            let mut e = self.hdr(p).head;
            while e != NIL {
                let r = self.entries[e as usize];
                ids.push((self.names.name_key(r.group), r.group));
                e = r.p_next;
            }
        }
        ids.sort_unstable();
        ids.dedup_by_key(|x| x.0);
        let mut out: Vec<String> = ids
            .into_iter()
            .map(|(_, g)| names::display(self.names.bytes(g)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Every live entry as (endpoint, presentation name, ip, expiry), soonest expiry first
    /// (what `fqdnguard cache list` prints).
    pub fn entries(&self) -> Vec<(Endpoint, String, IpAddr, f64)> {
        self.entries_ordered()
            .into_iter()
            .map(|(ep, name, ip, expires)| (ep, names::display(name), ip, expires))
            .collect()
    }

    /// Every live entry as (endpoint, wire name, ip, expiry), in (expiry, stamp) order.
    pub(crate) fn entries_ordered(&self) -> Vec<(Endpoint, &[u8], IpAddr, f64)> {
        let mut live: Vec<(f64, u32, u32)> = self
            .heap
            .iter()
            .map(|it| (it.expires, it.stamp, it.entry))
            .collect();
        live.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        live.into_iter()
            .map(|(expires, _, i)| {
                let e = self.entries[i as usize];
                let g = self.names.groups[e.group as usize];
                (
                    g.ep,
                    self.names.bytes(e.group),
                    self.pair_ip(e.pair),
                    expires,
                )
            })
            .collect()
    }

    /// Reads the entries of the (endpoint, name) groups from group slot `from` on, whole groups
    /// at a time, until at least `budget` entries were read; returns the slot to go on from, or
    /// None after the last group. Slots do not move, so a caller that releases the cache's lock
    /// between calls sees every entry that lives through its whole walk exactly once; entries
    /// made or changed meanwhile may or may not be seen. A group holds at most
    /// `max_ips_per_name` entries, which bounds the overshoot.
    pub fn visit(&self, from: u32, budget: usize, mut f: impl FnMut(EntryView<'_>)) -> Option<u32> {
        let slots = self.names.group_slots();
        let mut g = from as usize;
        let mut seen = 0usize;
        while g < slots {
            if seen >= budget {
                return Some(g as u32);
            }
            let gi = g as u32;
            g += 1;
            if !self.names.is_live(gi) {
                continue;
            }
            let group = self.names.groups[gi as usize];
            let (name, name_key) = (self.names.bytes(gi), self.names.name_key(gi));
            let mut e = group.head;
            while e != NIL {
                let r = self.entries[e as usize];
                let item = self.heap[r.pos as usize];
                f(EntryView {
                    endpoint: group.ep,
                    name,
                    name_key,
                    ip: self.pair_ip(r.pair),
                    expires: item.expires,
                    stamp: item.stamp,
                });
                seen += 1;
                e = r.g_next;
            }
        }
        None
    }

    /// Changes each time name keys ([`EntryView::name_key`]) may have been reassigned.
    pub fn name_key_epoch(&self) -> u64 {
        self.names.compactions()
    }

    pub(crate) fn counters(&self) -> (u64, u64) {
        (self.evictions, self.name_evictions)
    }

    /// Adds an entry read back from a snapshot (no changes are reported).
    pub(crate) fn restore(
        &mut self,
        ep: Endpoint,
        wire: &[u8],
        ip: IpAddr,
        expires: f64,
    ) -> Result<(), CacheError> {
        let g = self.group_or_insert(ep, wire)?;
        let mut t = Touches {
            off: true,
            ..Touches::default()
        };
        self.insert(g, ip, expires, &mut t);
        Ok(())
    }

    pub(crate) fn set_counters(&mut self, evictions: u64, name_evictions: u64) {
        self.evictions = evictions;
        self.name_evictions = name_evictions;
    }

    /// Checks every internal invariant; for tests.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut live = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if e.group == NIL {
                continue;
            }
            live += 1;
            let g = self.names.groups[e.group as usize];
            assert!(self.names.is_live(e.group), "entry {i} in a free group");
            let h = self.hdr(e.pair);
            assert_ne!(h.head, NIL, "entry {i} in a free pair");
            assert_eq!(h.ep, g.ep);
            let it = self.heap[e.pos as usize];
            assert_eq!(
                it.entry, i as u32,
                "entry {i} and its heap item point at each other"
            );
            assert!(it.expires <= h.expires);
        }
        assert_eq!(live, self.len);
        let mut groups = 0;
        let mut per_ep: HashMap<Endpoint, u32> = HashMap::new();
        for (gi, g) in self.names.groups.iter().enumerate() {
            if !self.names.is_live(gi as u32) {
                continue;
            }
            let mut n = 0;
            let mut e = g.head;
            let mut prev = NIL;
            while e != NIL {
                let r = self.entries[e as usize];
                assert_eq!(r.group, gi as u32);
                assert_eq!(r.g_prev, prev);
                prev = e;
                n += 1;
                e = r.g_next;
            }
            assert_eq!(n, g.count);
            assert!(g.count >= 1 && g.count <= self.cfg.max_ips_per_name);
            assert_eq!(
                self.names
                    .find(&self.hasher, g.ep, self.names.bytes(gi as u32)),
                Some(gi as u32),
                "group {gi} is found by its endpoint and name"
            );
            groups += 1;
            *per_ep.entry(g.ep).or_insert(0u32) += 1;
        }
        assert_eq!(groups, self.names.groups_len());
        assert_eq!(per_ep, self.endpoints, "groups per endpoint");
        for p in
            (0..self.v4.recs.len() as u32).chain((0..self.v6.recs.len() as u32).map(|i| i | V6))
        {
            let h = self.hdr(p);
            if h.head == NIL {
                continue;
            }
            let mut max = f64::NEG_INFINITY;
            let mut e = h.head;
            let mut prev = NIL;
            while e != NIL {
                let r = self.entries[e as usize];
                assert_eq!(r.pair, p);
                assert_eq!(r.p_prev, prev);
                max = max.max(self.heap[r.pos as usize].expires);
                prev = e;
                e = r.p_next;
            }
            let latest = h.expires;
            assert_eq!(max, latest, "pair expiry is the latest of its entries");
        }
        assert!(self.len <= self.cfg.max_entries as usize);
        assert_eq!(self.heap.len(), self.len, "one heap item per entry");
        for i in 1..self.heap.len() {
            assert!(
                !self.heap[i].before(&self.heap[(i - 1) / ARITY]),
                "heap order"
            );
        }
    }
}

#[cfg(test)]
impl Cache {
    /// (bytes allocated for the indexes, arena bytes in use, live name bytes).
    pub(crate) fn footprint(&self) -> (usize, usize, usize) {
        (
            self.names.index_bytes()
                + self.v4.map.allocation_size()
                + self.v6.map.allocation_size(),
            self.names.arena_len(),
            self.names.live_bytes(),
        )
    }
}
