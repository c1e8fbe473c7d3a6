//! Criterion: the cache core without Python: record (one answer), a batch of 1000 answers,
//! allowed checks on a 100k-entry cache, and expiring 10% of 100k entries.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use _core::cache::{Batch, Cache, Config};
use _core::pattern::LabelBuf;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const NOW: f64 = 1_700_000_000.0;

fn answer(i: u32) -> (LabelBuf, IpAddr, u32) {
    let name = format!("host{i}.svc{}.example.com", i % 100);
    (
        LabelBuf::from_presentation(name.as_bytes()).expect("valid"),
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i)),
        60 + i % 300,
    )
}

fn filled(n: u32) -> Cache {
    let mut c = Cache::new(Config::default());
    for i in 0..n {
        let (name, ip, ttl) = answer(i);
        c.record(1, &name, &[(ip, ttl)], NOW).expect("recorded");
    }
    c
}

fn benches(c: &mut Criterion) {
    let answers: Vec<_> = (0..100_000).map(answer).collect();
    let mut g = c.benchmark_group("cache");
    g.bench_function("record_new_name_100k_cache", |b| {
        let mut cache = filled(100_000);
        let mut i = 0usize;
        b.iter(|| {
            let (name, ip, ttl) = &answers[i % answers.len()];
            i += 1;
            black_box(cache.record(2, name, &[(*ip, *ttl)], NOW + i as f64))
        })
    });
    g.bench_function("record_batch_1000", |b| {
        let mut batch = Batch::with_capacity(1000);
        for (name, ip, ttl) in &answers[..1000] {
            batch.push(name, &[(*ip, *ttl)]);
        }
        b.iter_batched(
            || Cache::new(Config::default()),
            |mut cache| black_box(cache.record_batch(1, &batch, NOW)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("allowed_100k_cache", |b| {
        let cache = filled(100_000);
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(cache.allowed(1, answers[i % answers.len()].1, NOW))
        })
    });
    g.sample_size(10);
    g.bench_function("expire_10pct_of_100k", |b| {
        b.iter_batched(
            || filled(100_000),
            |mut cache| black_box(cache.expire(NOW + 89.0)),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(cache_benches, benches);
criterion_main!(cache_benches);
