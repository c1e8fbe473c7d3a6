//! The engine's counters and upstream latency histogram, read at scrape time.

/// Upper bounds (seconds) of the upstream latency histogram buckets; a last bucket is +Inf.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters since the engine started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub queries: u64,
    pub allowed: u64,
    pub denied: u64,
    pub unknown_source: u64,
    pub malformed: u64,
    /// Turned away with SERVFAIL: every in-flight slot taken (its own share, or all).
    pub overloaded: u64,
    /// Of `overloaded`: the client had used up its own share.
    pub overloaded_client: u64,
    /// Queries ended early (SERVFAIL) to give their slot to a client holding fewer.
    pub evicted: u64,
    /// Queries that joined an identical one already in flight instead of going upstream.
    pub merged: u64,
    /// Answers dropped because the name was not in the case it was sent in (0x20).
    pub dropped_case: u64,
    /// Channels on which 0x20 was turned off (an upstream that does not keep case).
    pub case_fallbacks: u64,
    pub timeouts: u64,
    /// UDP queries sent upstream again (a copy, same bytes) for want of an answer.
    pub retransmits: u64,
    pub cancelled: u64,
    pub dropped_unmatched: u64,
    pub dropped_mismatch: u64,
    pub dropped_malformed: u64,
    pub cache_errors: u64,
    /// Expiry extensions not sent to the backend (the element had over half the new TTL left).
    pub refreshes_skipped: u64,
    /// Client queries waiting for an upstream answer.
    pub inflight: u64,
    /// Queries sent upstream and not yet answered (merged ones count once).
    pub upstream_inflight: u64,
    /// Answers relayed (and SERVFAILs for timeouts) by rcode 0..=15; higher rcodes in the last.
    pub rcodes: [u64; 17],
    /// Counts per bucket of [`LATENCY_BUCKETS`] (not cumulative), then +Inf.
    pub latency_counts: [u64; 14],
    pub latency_sum: f64,
}

impl EngineStats {
    pub(super) fn record_rcode(&mut self, rcode: u16) {
        self.rcodes[usize::from(rcode).min(16)] += 1;
    }

    pub(super) fn observe_latency(&mut self, seconds: f64) {
        let seconds = seconds.max(0.0);
        self.latency_sum += seconds;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_counts[i] += 1;
    }
}
