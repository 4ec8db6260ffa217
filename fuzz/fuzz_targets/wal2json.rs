//! Fuzz target: the wal2json decoder never panics, whatever the bytes.
//!
//! The input is split at newlines into documents fed to one decoder in order, so the
//! fuzzer can build transactions (held-back TRUNCATEs, Begin/Origin) as well as single
//! documents. Seed it with the documents of `src/decode/fixtures/wal2json/*.txt`.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use walbridge::decode::wal2json::Wal2JsonDecoder;
use walbridge::event::{Column, Relation, ReplicaIdentity};
use walbridge::lsn::Lsn;

fn table(name: &str, identity: ReplicaIdentity, columns: &[(&str, u32, bool)]) -> Arc<Relation> {
    Arc::new(Relation {
        oid: 16384,
        schema: "public".into(),
        table: name.into(),
        replica_identity: identity,
        columns: columns
            .iter()
            .map(|&(name, type_oid, is_key)| Column {
                name: name.into(),
                type_oid,
                type_modifier: -1,
                is_key,
            })
            .collect(),
    })
}

fn decoder() -> Wal2JsonDecoder {
    let mut decoder = Wal2JsonDecoder::new();
    let default = ReplicaIdentity::Default;
    // Tables of the fixtures, so seeds reach the tuple code.
    decoder.register_relation(
        table(
            "comp_key",
            default,
            &[("a", 23, true), ("b", 25, true), ("v", 25, false)],
        ),
        vec![],
    );
    decoder.register_relation(
        table(
            "toasty",
            default,
            &[("id", 23, true), ("big", 25, false), ("other", 23, false)],
        ),
        vec![],
    );
    decoder.register_relation(
        table(
            "full_t",
            ReplicaIdentity::Full,
            &[("id", 23, true), ("v", 25, true), ("big", 25, true)],
        ),
        vec![],
    );
    decoder.register_relation(
        table(
            "gen_t",
            default,
            &[("id", 23, true), ("a", 23, false), ("ident", 20, false)],
        ),
        vec!["doubled".into()],
    );
    decoder.register_relation(table("parent", default, &[("id", 23, true)]), vec![]);
    decoder.register_relation(
        table("child", default, &[("id", 23, true), ("pid", 23, false)]),
        vec![],
    );
    decoder.register_relation(
        table(
            "t",
            default,
            &[("id", 23, true), ("by", 17, false), ("n", 1700, false)],
        ),
        vec![],
    );
    decoder.register_origin(1, "walbridge_from_east");
    decoder.register_origin(2, "other_origin");
    decoder
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = decoder();
    let mut out = Vec::new();
    for (i, document) in data.split(|&b| b == b'\n').enumerate() {
        let _ = decoder.decode_into(Lsn(i as u64), document, &mut out);
    }
});
