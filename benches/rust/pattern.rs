//! Criterion: suffix-trie lookups at 100, 10k and 100k patterns, and compile time.

use std::hint::black_box;

use _core::pattern::{parse_match_name, parse_match_pattern, LabelBuf, PatternTrie};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// A realistic mix: exact names, `*.` subdomains, `**.` multi-level, and mid-label wildcards.
fn corpus(n: usize) -> Vec<(String, bool)> {
    (0..n)
        .map(|i| match i % 4 {
            0 => (
                format!("api{i}.service{}.example{}.com", i % 97, i % 13),
                true,
            ),
            1 => (format!("*.cdn{i}.example{}.net", i % 11), false),
            2 => (format!("**.tenant{i}.cloud{}.io", i % 7), false),
            _ => (format!("api-*-prod{i}.region{}.example.org", i % 5), false),
        })
        .collect()
}

fn build(n: usize) -> PatternTrie {
    let mut t = PatternTrie::new();
    for (id, (text, is_name)) in corpus(n).iter().enumerate() {
        let p = if *is_name {
            parse_match_name(text)
        } else {
            parse_match_pattern(text)
        };
        t.insert(&p.expect("valid"), id as u32);
    }
    t
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("trie_matches");
    for n in [100usize, 10_000, 100_000] {
        let t = build(n);
        let k = n / 2 - (n / 2) % 4 + 1; // a `*.cdn` entry well inside the set
        let hit = format!("www.cdn{k}.example{}.net", k % 11);
        let miss = "www.unrelated-site.example.com";
        let names: Vec<LabelBuf> = [hit.as_str(), miss]
            .iter()
            .map(|s| LabelBuf::from_presentation(s.as_bytes()).expect("valid"))
            .collect();
        assert!(t.matches(&names[0]) && !t.matches(&names[1]));
        g.bench_with_input(BenchmarkId::new("hit", n), &n, |b, _| {
            b.iter(|| t.matches(black_box(&names[0])))
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| t.matches(black_box(&names[1])))
        });
        g.bench_with_input(BenchmarkId::new("parse+match", n), &n, |b, _| {
            b.iter(|| {
                let name = LabelBuf::from_presentation(black_box(hit.as_bytes())).expect("valid");
                t.matches(&name)
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("name_parse");
    g.bench_function("presentation", |b| {
        b.iter(|| LabelBuf::from_presentation(black_box(b"www12.Example.com.")).map(|n| n.len()))
    });
    g.bench_function("escaped", |b| {
        b.iter(|| LabelBuf::from_presentation(black_box(b"a\\.b.Example.com.")).map(|n| n.len()))
    });
    g.finish();
    let mut g = c.benchmark_group("trie_compile");
    g.sample_size(10);
    g.bench_function("100k", |b| b.iter(|| build(100_000)));
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
