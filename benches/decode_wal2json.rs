//! Decode throughput of the wal2json format-version 2 decoder.
//!
//! The workload is one transaction as wal2json 2.5 prints it (document shapes copied from
//! `src/decode/fixtures/wal2json/bench_template.txt`): Begin, 1,000 inserts of a 6-column row
//! (bigint, text, numeric, bool, timestamptz, text with quotes or NULL), 200 updates that keep
//! the key, Commit. Reported per document and per byte.

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use walbridge::decode::wal2json::Wal2JsonDecoder;
use walbridge::event::{Column, Relation, ReplicaIdentity};
use walbridge::lsn::Lsn;

const HEAD: &str = r#""xid":785,"timestamp":"2026-11-21 08:53:15.849537+00","origin":0"#;

fn accounts() -> Arc<Relation> {
    let column = |name: &str, type_oid, type_modifier, is_key| Column {
        name: name.into(),
        type_oid,
        type_modifier,
        is_key,
    };
    Arc::new(Relation {
        oid: 16496,
        schema: "public".into(),
        table: "accounts".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", 20, -1, true),
            column("owner", 25, -1, false),
            column("balance", 1700, 786438, false),
            column("active", 16, -1, false),
            column("created", 1184, -1, false),
            column("note", 25, -1, false),
        ],
    })
}

fn columns(id: u64, balance: &str) -> String {
    let note = if id.is_multiple_of(3) {
        "null".to_string()
    } else {
        format!(r#""note \"{id}\"""#)
    };
    format!(
        concat!(
            r#""columns":[{{"name":"id","type":"bigint","typeoid":20,"value":{id}}},"#,
            r#"{{"name":"owner","type":"text","typeoid":25,"value":"owner {id}"}},"#,
            r#"{{"name":"balance","type":"numeric(12,2)","typeoid":1700,"value":{balance}}},"#,
            r#"{{"name":"active","type":"boolean","typeoid":16,"value":{active}}},"#,
            r#"{{"name":"created","type":"timestamp with time zone","typeoid":1184,"value":"2026-01-01 00:{min:02}:00+00"}},"#,
            r#"{{"name":"note","type":"text","typeoid":25,"value":{note}}}]"#,
        ),
        id = id,
        balance = balance,
        active = id.is_multiple_of(2),
        min = id % 60,
        note = note,
    )
}

/// `(wal_start, document)` for the whole transaction.
fn workload() -> Vec<(Lsn, Vec<u8>)> {
    let pk = r#""pk":[{"name":"id","type":"bigint","typeoid":20}]"#;
    let change_lsn = |i: u64| Lsn(0x15D_0D28 + (i - 1) * 0xA0);
    let mut docs = vec![format!(
        r#"{{"action":"B",{HEAD},"lsn":"0/1600000","nextlsn":"0/1600030"}}"#
    )];
    for id in 1..=1000u64 {
        let balance = format!("{}.{:02}", id * 125 / 100, id * 25 % 100);
        docs.push(format!(
            r#"{{"action":"I",{HEAD},"lsn":"{}","schema":"public","table":"accounts",{},{pk}}}"#,
            change_lsn(id),
            columns(id, &balance)
        ));
    }
    for id in 1..=200u64 {
        let balance = format!("{}.{:02}", id * 125 / 100 + 1, id * 25 % 100);
        docs.push(format!(
            concat!(
                r#"{{"action":"U",{HEAD},"lsn":"{}","schema":"public","table":"accounts",{},"#,
                r#""identity":[{{"name":"id","type":"bigint","typeoid":20,"value":{}}}],{}}}"#
            ),
            change_lsn(1000 + id),
            columns(id, &balance),
            id,
            pk,
            HEAD = HEAD,
        ));
    }
    docs.push(format!(
        r#"{{"action":"C",{HEAD},"lsn":"0/1600000","nextlsn":"0/1600030"}}"#
    ));
    let last = docs.len() as u64 - 1;
    docs.into_iter()
        .enumerate()
        .map(|(i, doc)| {
            let at = match i as u64 {
                0 => change_lsn(1),
                i if i == last => Lsn(0x160_0030),
                i => change_lsn(i),
            };
            (at, doc.into_bytes())
        })
        .collect()
}

fn decode_all(
    decoder: &mut Wal2JsonDecoder,
    docs: &[(Lsn, Vec<u8>)],
    out: &mut Vec<walbridge::event::Event>,
) {
    for (lsn, doc) in docs {
        out.clear();
        decoder
            .decode_into(*lsn, doc, out)
            .expect("the workload decodes");
        black_box(&*out);
    }
}

fn bench(c: &mut Criterion) {
    let docs = workload();
    // The generated documents have the captured shape: same text but for the LSNs.
    let captured = include_str!("../src/decode/fixtures/wal2json/bench_template.txt");
    for (line, (_, doc)) in captured.lines().zip(&docs).take(4) {
        let doc = std::str::from_utf8(doc).expect("UTF-8");
        let line = line.split_once('\t').expect("lsn<TAB>document").1;
        let (a, b) = (
            line.find(",\"lsn\"").unwrap(),
            doc.find(",\"lsn\"").unwrap(),
        );
        assert_eq!(line[..a], doc[..b]);
        let (a, b) = (
            line.find(",\"schema\"").unwrap_or(line.len()),
            doc.find(",\"schema\"").unwrap_or(doc.len()),
        );
        assert_eq!(line[a..], doc[b..]);
    }
    let bytes: usize = docs.iter().map(|(_, d)| d.len()).sum();
    let mut decoder = Wal2JsonDecoder::new();
    decoder.register_relation(accounts(), vec![]);
    let mut out = Vec::new();
    decode_all(&mut decoder, &docs, &mut out);

    let mut group = c.benchmark_group("wal2json");
    group.throughput(Throughput::Elements(docs.len() as u64));
    group.bench_function("messages", |b| {
        b.iter_batched_ref(
            Vec::new,
            |out| decode_all(&mut decoder, &docs, out),
            BatchSize::SmallInput,
        )
    });
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("bytes", |b| {
        b.iter_batched_ref(
            Vec::new,
            |out| decode_all(&mut decoder, &docs, out),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
