//! Criterion: Rust-only parse time of the wire corpus (benches/data, the same messages the
//! Python bench parses), per entry point, and the same corpus parsed by the `simple-dns` crate
//! (the comparison behind the own-parser decision, see benches/README.wire.md).

use std::hint::black_box;
use std::path::Path;

use _core::wire::{resolve, Message, QueryView};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn load(name: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/data")
        .join(name);
    let raw = std::fs::read(&path).expect("corpus file (run benches/make_wire_corpus.py)");
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= raw.len() {
        let n = usize::from(u16::from_be_bytes([raw[i], raw[i + 1]]));
        out.push(raw[i + 2..i + 2 + n].to_vec());
        i += 2 + n;
    }
    out
}

fn parse(c: &mut Criterion) {
    for (kind, msgs) in [
        ("queries", load("wire_queries.bin")),
        ("answers", load("wire_answers.bin")),
    ] {
        for m in &msgs {
            Message::parse(m).expect("corpus parses");
            simple_dns::Packet::parse(m).expect("corpus parses in simple-dns");
        }
        let mut g = c.benchmark_group(format!("wire_{kind}"));
        g.throughput(Throughput::Elements(msgs.len() as u64));
        g.bench_function("Message::parse", |b| {
            b.iter(|| {
                for m in &msgs {
                    black_box(Message::parse(black_box(m)).ok());
                }
            })
        });
        if kind == "queries" {
            g.bench_function("QueryView::parse+labels", |b| {
                b.iter(|| {
                    for m in &msgs {
                        black_box(QueryView::parse(black_box(m)).map(|q| q.labels()).ok());
                    }
                })
            });
        } else {
            g.bench_function("resolve", |b| {
                b.iter(|| {
                    for m in &msgs {
                        black_box(resolve(black_box(m)).ok());
                    }
                })
            });
        }
        g.bench_function("simple_dns::Packet::parse", |b| {
            b.iter(|| {
                for m in &msgs {
                    black_box(simple_dns::Packet::parse(black_box(m)).ok());
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, parse);
criterion_main!(benches);
