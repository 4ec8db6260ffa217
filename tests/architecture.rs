//! The architecture test: imports inside `src/` point one way, down the layer order below.
//!
//! It reads every `crate::…` path in every file under `src/` (comments skipped) and fails
//! naming the file, the line and the import when a module reaches a layer above its own, when
//! modules of one layer import each other in a cycle, or when a module is in no layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules of `src/`, from the top layer down. A module may use modules of its own
/// layer (without a cycle) and of every layer below it, never one above.
const LAYERS: &[(&str, &[&str])] = &[
    // parse arguments, exit codes; `demo` runs setup and the runtime on throwaway clusters
    ("commands", &["cli", "demo"]),
    // the only place that spawns tasks: one supervised worker per direction
    ("runtime", &["runtime"]),
    // the jobs walbridge does, each started by a command or by the runtime
    (
        "jobs",
        &[
            "setup",
            "copy",
            "verify",
            "tail",
            "status",
            "forensics",
            "drift",
            "skip",
            "http",
        ],
    ),
    // one direction's work: read changes, decide conflicts, apply them
    ("pipeline", &["source", "apply", "conflict", "trigger"]),
    // what the pipeline, the jobs and the runtime share about a direction
    ("direction", &["direction"]),
    // the wire: replication protocol, SQL sessions, pure decoders
    ("wire", &["protocol", "pgconn", "decode"]),
    // leaves: plain data, configuration, metrics and logging
    (
        "leaves",
        &[
            "config",
            "dsn",
            "lsn",
            "event",
            "catalog",
            "metrics",
            "telemetry",
            "tls",
            "version",
            "assets",
            "localpg",
        ],
    ),
];

/// One `crate::<module>` reference in a source file.
#[derive(Clone, Debug)]
struct Import {
    file: String,
    line: usize,
    from: String,
    to: String,
    text: String,
}

/// The layer index of a top-level module (0 = top).
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

/// The top-level module a file under `src/` belongs to (`src/apply/sql.rs` → `apply`);
/// `None` for the crate root files.
fn module_of(relative: &Path) -> Option<String> {
    let mut parts = relative.components();
    let first = parts.next()?.as_os_str().to_str()?.to_string();
    if parts.next().is_some() {
        return Some(first);
    }
    let stem = first.strip_suffix(".rs")?;
    (stem != "lib" && stem != "main").then(|| stem.to_string())
}

/// The line without its `//` comment (a `//` inside a string literal is rare enough in
/// `src/` that cutting there loses nothing this test looks for).
fn code_of(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Every `crate::<name>` in `text` with the module it names, including each item of a
/// grouped import (`use crate::{a::X, b};`, over several lines too).
fn imports_in(file: &str, from: &str, text: &str) -> Vec<Import> {
    let mut found = Vec::new();
    let mut in_block_comment = false;
    // Inside `crate::{ ... }`: the brace depth (0 outside), and whether the next word starts
    // an item of the group.
    let mut group = 0usize;
    let mut item_next = false;
    for (n, raw) in text.lines().enumerate() {
        let mut line = raw;
        if in_block_comment {
            match line.find("*/") {
                Some(i) => {
                    line = &line[i + 2..];
                    in_block_comment = false;
                }
                None => continue,
            }
        }
        let mut code = code_of(line).to_string();
        if let Some(i) = code.find("/*") {
            if !code[i..].contains("*/") {
                in_block_comment = true;
            }
            code.truncate(i);
        }
        let mut push = |to: String| {
            if !to.is_empty() && to != from {
                found.push(Import {
                    file: file.to_string(),
                    line: n + 1,
                    from: from.to_string(),
                    to,
                    text: raw.trim().to_string(),
                });
            }
        };
        let word = |at: &str| -> String {
            at.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let bytes = code.as_bytes();
        let mut start = 0;
        while start < code.len() {
            if group > 0 {
                let c = bytes[start];
                match c {
                    b'{' => group += 1,
                    b'}' => group -= 1,
                    b',' if group == 1 => item_next = true,
                    c if item_next && group == 1 && (c == b'_' || c.is_ascii_alphabetic()) => {
                        let w = word(&code[start..]);
                        start += w.len();
                        item_next = false;
                        push(w);
                        continue;
                    }
                    _ => {}
                }
                start += 1;
                continue;
            }
            let Some(pos) = code[start..].find("crate::") else {
                break;
            };
            let at = start + pos;
            start = at + "crate::".len();
            // `$crate::` (macros) and identifiers ending in `crate` are not the crate root.
            if at > 0 {
                let before = bytes[at - 1];
                if before == b'$' || before == b'_' || before.is_ascii_alphanumeric() {
                    continue;
                }
            }
            if code[start..].starts_with('{') {
                group = 1;
                item_next = true;
                start += 1;
                continue;
            }
            push(word(&code[start..]));
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every top-level module of `src/` and every cross-module import, read from disk.
fn read_tree() -> (BTreeSet<String>, Vec<Import>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = BTreeSet::new();
    let mut imports = Vec::new();
    for path in files {
        let Ok(relative) = path.strip_prefix(&src) else {
            continue;
        };
        let Some(module) = module_of(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let file = format!("src/{}", relative.display());
        imports.extend(imports_in(&file, &module, &text));
        modules.insert(module);
    }
    (modules, imports)
}

/// The sentences naming every import against the layer order, every module in no layer, and
/// every cycle between modules of one layer.
fn violations(modules: &BTreeSet<String>, imports: &[Import]) -> Vec<String> {
    let mut out = Vec::new();
    for m in modules {
        if layer_of(m).is_none() {
            out.push(format!(
                "module `{m}` is in no layer: add it to LAYERS in tests/architecture.rs \
                 (and the picture in the README's Development section)"
            ));
        }
    }
    let mut same_layer: BTreeMap<&str, BTreeMap<&str, &Import>> = BTreeMap::new();
    for i in imports {
        let (Some(from), Some(to)) = (layer_of(&i.from), layer_of(&i.to)) else {
            continue;
        };
        if to < from {
            out.push(format!(
                "{}:{}: `{}` ({} layer) imports `{}` from the {} layer above it: `{}`; move what \
                 both need down to a layer below `{}`",
                i.file, i.line, i.from, LAYERS[from].0, i.to, LAYERS[to].0, i.text, i.from
            ));
        } else if to == from {
            same_layer
                .entry(i.from.as_str())
                .or_default()
                .entry(i.to.as_str())
                .or_insert(i);
        }
    }
    out.extend(cycles(&same_layer));
    out
}

/// Cycles in the graph of imports between modules of one layer, each named by its imports.
fn cycles(edges: &BTreeMap<&str, BTreeMap<&str, &Import>>) -> Vec<String> {
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, BTreeMap<&'a str, &'a Import>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        out: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<&str> = path[at..].to_vec();
            cycle.push(node);
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let i = edges[w[0]][w[1]];
                    format!("{}:{}: `{}`", i.file, i.line, i.text)
                })
                .collect();
            out.push(format!(
                "import cycle {}: {}",
                cycle.join(" -> "),
                steps.join("; ")
            ));
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node);
        if let Some(next) = edges.get(node) {
            for to in next.keys() {
                visit(to, edges, path, done, out);
            }
        }
        path.pop();
        done.insert(node);
    }
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        visit(node, edges, &mut Vec::new(), &mut done, &mut out);
    }
    out
}

#[test]
fn imports_point_down_the_layer_order() {
    let (modules, imports) = read_tree();
    assert!(
        modules.len() > 10 && imports.len() > 100,
        "read too little of src/: {} modules, {} imports",
        modules.len(),
        imports.len()
    );
    let found = violations(&modules, &imports);
    assert!(
        found.is_empty(),
        "imports against the layer order (see the README's Development section):\n{}",
        found.join("\n")
    );
}

#[test]
fn an_upward_import_is_named() {
    let modules: BTreeSet<String> = ["apply", "runtime", "setup", "copy", "lsn"]
        .map(String::from)
        .into();
    let mut imports = imports_in(
        "src/apply/careful.rs",
        "apply",
        "//! uses crate::runtime in a comment only\n\
         use crate::lsn::Lsn;\n\
         use crate::runtime::DirectionError; // the upward one\n",
    );
    imports.extend(imports_in(
        "src/setup/mod.rs",
        "setup",
        "use crate::copy::plan;\n",
    ));
    imports.extend(imports_in(
        "src/copy/mod.rs",
        "copy",
        "fn f() -> crate::setup::Problem { todo!() }\n",
    ));
    let found = violations(&modules, &imports);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("src/apply/careful.rs:3: `apply` (pipeline layer) imports `runtime`"),
        "{}",
        found[0]
    );
    assert!(
        found[1].starts_with("import cycle copy -> setup -> copy"),
        "{}",
        found[1]
    );
    let unknown = violations(&["nowhere".to_string()].into(), &[]);
    assert!(
        unknown[0].contains("`nowhere` is in no layer"),
        "{unknown:?}"
    );
}

#[test]
fn macro_and_identifier_uses_of_crate_are_not_imports() {
    let found = imports_in(
        "src/x.rs",
        "x",
        "$crate::lsn::Lsn; my_crate::a; /* crate::runtime\n crate::runtime */ crate::event::E",
    );
    let to: Vec<&str> = found.iter().map(|i| i.to.as_str()).collect();
    assert_eq!(to, ["event"]);
}

#[test]
fn grouped_imports_are_read_item_by_item() {
    let found = imports_in(
        "src/apply/x.rs",
        "apply",
        "use crate::{lsn::Lsn, event::{Begin, Commit}};\n\
         use crate::{\n    apply::sql,\n    // crate::runtime in a comment\n    \
         runtime::{DirectionError, Outcome},\n};\n\
         use crate::catalog;\n",
    );
    let to: Vec<(&str, usize)> = found.iter().map(|i| (i.to.as_str(), i.line)).collect();
    assert_eq!(
        to,
        [("lsn", 1), ("event", 1), ("runtime", 5), ("catalog", 7)]
    );
}
