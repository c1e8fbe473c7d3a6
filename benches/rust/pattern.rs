//! Criterion: suffix-trie lookups at 100, 10k and 100k patterns, and compile time.

use std::hint::black_box;

use _core::pattern::{parse_match_name, parse_match_pattern, LabelBuf, PatternTrie, TextName};
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

/// Names as benches/corpus.py `lookup_names` makes them: three in four match an entry.
fn mix_names(n: usize) -> Vec<String> {
    let mut x: u64 = 7;
    (0..256)
        .map(|j| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (x >> 33) as usize % n;
            match (j % 4 == 3, i % 4) {
                (true, _) => format!("www{j}.unrelated{i}.example.com"),
                (_, 0) => format!("api{i}.service{}.example{}.com", i % 97, i % 13),
                (_, 1) => format!("www{j}.cdn{i}.example{}.net", i % 11),
                (_, 2) => format!("a.b{j}.tenant{i}.cloud{}.io", i % 7),
                _ => format!("api-eu{j}-prod{i}.region{}.example.org", i % 5),
            }
        })
        .collect()
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
    // The Python benchmark's mix: 256 names, three in four matching, as text.
    let mut g = c.benchmark_group("mix_256_names");
    let n = 100_000;
    let t = build(n);
    let names = mix_names(n);
    g.bench_function("text_view", |b| {
        b.iter(|| {
            names
                .iter()
                .filter(|s| TextName::new(black_box(s.as_bytes())).is_some())
                .count()
        })
    });
    g.bench_function("text_view+match", |b| {
        b.iter(|| {
            names
                .iter()
                .filter(|s| t.matches(&TextName::new(black_box(s.as_bytes())).expect("plain")))
                .count()
        })
    });
    g.bench_function("labelbuf+match", |b| {
        b.iter(|| {
            names
                .iter()
                .filter(|s| {
                    t.matches(&LabelBuf::from_presentation(black_box(s.as_bytes())).expect("ok"))
                })
                .count()
        })
    });
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
