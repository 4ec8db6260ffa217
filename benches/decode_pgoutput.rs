//! pgoutput decode throughput over payloads captured from PostgreSQL 15.
//!
//! The workload is one transaction on a 6-column table (bigint, text, text, numeric,
//! timestamptz, bool) built from the real messages in `benches/fixtures/pgoutput/`:
//! Begin, Relation, 1,000 inserts, 200 updates, 100 deletes, Commit. It is decoded by a
//! fresh decoder per iteration, in text mode and in binary mode, and reported both in
//! messages per second and in bytes per second.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use walbridge::decode::pgoutput::PgOutputDecoder;
use walbridge::lsn::Lsn;

/// Parses a fixture: `<LSN> <hex>` lines, `#` comments.
fn fixture(text: &str) -> Vec<(Lsn, Bytes)> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("bad hex digit {c}"),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (lsn, hex) = l.split_once(' ').expect("fixture line is `<LSN> <hex>`");
            let bytes: Vec<u8> = hex
                .as_bytes()
                .chunks(2)
                .map(|p| (digit(p[0]) << 4) | digit(p[1]))
                .collect();
            (lsn.parse().expect("fixture LSN"), Bytes::from(bytes))
        })
        .collect()
}

/// Expands the captured transaction (Begin, Relation, Insert, Insert, Update, Delete, Commit)
/// into 1,000 inserts, 200 updates and 100 deletes.
fn transaction(text: &str) -> Vec<(Lsn, Bytes)> {
    let m = fixture(text);
    assert_eq!(m.len(), 7, "fixture should hold one 5-change transaction");
    let (begin, relation, inserts, update, delete, commit) =
        (&m[0], &m[1], [&m[2], &m[3]], &m[4], &m[5], &m[6]);
    let mut out = vec![begin.clone(), relation.clone()];
    out.extend((0..1000).map(|i| inserts[i % 2].clone()));
    out.extend((0..200).map(|_| update.clone()));
    out.extend((0..100).map(|_| delete.clone()));
    out.push(commit.clone());
    out
}

/// How to count one decoded transaction: in messages or in payload bytes.
type ThroughputOf = fn(&[(Lsn, Bytes)]) -> Throughput;

/// Decodes the whole transaction per iteration, in text and binary mode.
fn bench(c: &mut Criterion) {
    let cases = [
        (
            "text",
            transaction(include_str!("fixtures/pgoutput/bench_txn_text.txt")),
        ),
        (
            "binary",
            transaction(include_str!("fixtures/pgoutput/bench_txn_binary.txt")),
        ),
    ];
    let units: [(&str, ThroughputOf); 2] = [
        ("messages", |m| Throughput::Elements(m.len() as u64)),
        ("bytes", |m| {
            Throughput::Bytes(m.iter().map(|(_, b)| b.len() as u64).sum())
        }),
    ];
    for (unit, throughput) in units {
        let mut group = c.benchmark_group(format!("pgoutput_txn_{unit}"));
        for (mode, messages) in &cases {
            group.throughput(throughput(messages));
            group.bench_function(*mode, |b| {
                b.iter(|| {
                    let mut decoder = PgOutputDecoder::new();
                    for (lsn, bytes) in messages {
                        let event = decoder.decode(*lsn, bytes).expect("fixture decodes");
                        black_box(event);
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
