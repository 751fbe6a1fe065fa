//! The layering rule, checked on the source: the top-level modules of `src/` (a file or a
//! folder) and the others each names through `crate::` form no import circle, and the
//! decision core (`admission`, `routing`, `breaker`, `limits`: state and a clock in, decisions
//! out) names no HTTP or I/O crate. Unit tests (`#[cfg(test)]` and after) are not counted.
//! Reads files only; runs in the hermetic suite.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The decision core: pure, tested exhaustively; the I/O shell carries its decisions out.
const CORE: &[&str] = &["admission", "routing", "breaker", "limits"];

/// What the core must not name.
const IO: &[&str] = &[
    "axum::",
    "hyper::",
    "hyper_util::",
    "reqwest::",
    "tower::",
    "tokio::net",
    "tokio::process",
    "tokio::fs",
    "redis::",
    "std::net",
    "std::fs",
    "std::process",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its unit tests (everything from the first `#[cfg(test)]`).
fn code_of(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Every `crate::NAME` a text names, `use crate::{a, b::c}` included.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for part in group.split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to.
fn module_of(src: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(src).unwrap();
    let top = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    top.trim_end_matches(".rs").to_string()
}

/// The import graph of `src/`: module -> the modules it names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let m = module_of(src, &f);
        if m == "main" || m == "lib" {
            continue;
        }
        let deps = g.entry(m.clone()).or_default();
        deps.extend(crate_refs(&code_of(&f)).into_iter().filter(|d| *d != m));
    }
    g
}

/// The import circles of `g` (strongly connected components of more than one module).
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: the order of finishing on g, then components on the reversed graph.
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(v.to_string()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            visit(w, g, seen, out);
        }
        out.push(v.to_string());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for v in g.keys() {
        visit(v, g, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (v, ws) in g {
        for w in ws {
            rev.entry(w.clone()).or_default().insert(v.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for v in order.iter().rev() {
        let mut comp = Vec::new();
        visit(v, &rev, &mut seen, &mut comp);
        if comp.len() > 1 {
            comp.sort();
            out.push(comp);
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_modules_of_src_form_no_import_circle() {
    let g = graph(&src());
    assert!(g.len() >= 10, "too few modules found: {g:?}");
    let found = circles(&g);
    assert!(found.is_empty(), "import circles: {found:?}");
}

#[test]
fn the_decision_core_names_no_http_or_io_crate() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut bad = Vec::new();
    for f in files {
        if !CORE.contains(&module_of(&src(), &f).as_str()) {
            continue;
        }
        let code = code_of(&f);
        for io in IO {
            if code.contains(io) {
                bad.push(format!("{}: {io}", f.display()));
            }
        }
    }
    assert!(bad.is_empty(), "the decision core does I/O: {bad:?}");
}

#[test]
fn the_check_finds_what_it_looks_for() {
    // A circle and a core import, made up: the checks above cannot pass by finding nothing.
    let refs = crate_refs("use crate::{a, b::c};\nfn f() { crate::d::e(); }");
    assert_eq!(
        refs,
        ["a", "b", "d"].iter().map(|s| s.to_string()).collect()
    );
    let mut g = BTreeMap::new();
    g.insert("x".to_string(), ["y".to_string()].into());
    g.insert("y".to_string(), ["z".to_string()].into());
    g.insert("z".to_string(), ["x".to_string()].into());
    g.insert("w".to_string(), ["x".to_string()].into());
    assert_eq!(circles(&g), vec![vec!["x", "y", "z"]]);
}
