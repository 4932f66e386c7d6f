//! Source-level checks of the architecture invariants listed in `src/lib.rs`, after
//! rust-analyzer's tidy tests: they read the source tree as text.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, fs::read_to_string(&p).unwrap())
        })
        .collect()
}

fn is_test_file(rel: &str) -> bool {
    rel.ends_with("_tests.rs")
}

/// The part of a file before its `#[cfg(test)]` module.
fn non_test_part(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

fn is_core(rel: &str) -> bool {
    rel.starts_with("wire/")
        || matches!(
            rel,
            "tracker/state.rs"
                | "tracker/state/snapshot.rs"
                | "tracker/core.rs"
                | "tracker/password_queue.rs"
                | "tracker/replica.rs"
                | "client/session.rs"
                | "client/command.rs"
                | "client/uplink.rs"
                | "client/uploader.rs"
                | "client/slots.rs"
                | "client/unsent.rs"
                | "client/download/picker.rs"
                | "client/download/engine.rs"
                | "net/secure.rs"
        )
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    for (rel, text) in src_files() {
        if is_test_file(&rel) {
            continue;
        }
        assert!(
            text.trim_start().starts_with("//!"),
            "{rel} must start with a //! module doc"
        );
    }
}

#[test]
fn cores_do_no_io() {
    for (rel, text) in src_files() {
        if !is_core(&rel) || is_test_file(&rel) {
            continue;
        }
        let code = non_test_part(&text);
        for banned in [
            "mio",
            "Instant::now",
            "TcpStream",
            "TcpListener",
            "std::thread",
        ] {
            assert!(
                !code.contains(banned),
                "{rel}: a sans-IO core must not use `{banned}`"
            );
        }
    }
}

#[test]
fn unsafe_only_in_storage() {
    for (rel, text) in src_files() {
        if rel == "storage.rs" {
            continue;
        }
        assert!(
            !text.contains("unsafe "),
            "{rel}: `unsafe` belongs in storage.rs only"
        );
    }
}

#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let (_, text) = src_files()
        .into_iter()
        .find(|(rel, _)| rel == "storage.rs")
        .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("unsafe {") {
            let before = &lines[i.saturating_sub(8)..i];
            assert!(
                before.iter().any(|l| l.contains("SAFETY:")),
                "storage.rs:{}: unsafe block without a SAFETY comment",
                i + 1
            );
        }
    }
}

#[test]
fn no_unwrap_or_expect_in_cores() {
    for (rel, text) in src_files() {
        if !is_core(&rel) || is_test_file(&rel) {
            continue;
        }
        let code = non_test_part(&text);
        for banned in [".unwrap()", ".expect("] {
            assert!(
                !code.contains(banned),
                "{rel}: `{banned}` outside tests; return an error instead"
            );
        }
    }
}

#[test]
fn cores_touch_no_files() {
    // The driver looks at the file system for them (`client::disk`) and hands the answers in.
    for (rel, text) in src_files() {
        if !is_core(&rel) || is_test_file(&rel) {
            continue;
        }
        let code = non_test_part(&text);
        for banned in [
            "std::fs",
            "fs::",
            "File::",
            ".is_dir()",
            ".is_file()",
            ".exists()",
            "symlink_metadata",
            "canonicalize",
        ] {
            assert!(
                !code.contains(banned),
                "{rel}: a sans-IO core must not touch files (`{banned}`)"
            );
        }
    }
}

#[test]
fn wire_depends_on_nothing_but_itself_and_bitfield() {
    for (rel, text) in src_files() {
        if !rel.starts_with("wire/") || is_test_file(&rel) {
            continue;
        }
        let code = non_test_part(&text);
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            assert!(
                rest.starts_with("wire") || rest.starts_with("bitfield"),
                "{rel}: `wire` may use only itself and `bitfield`, not `crate::{}`",
                rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or("")
            );
        }
        assert!(
            !code.contains("super::super"),
            "{rel}: `wire` may use only itself and `bitfield`"
        );
    }
}

#[test]
fn cores_use_ordered_maps() {
    // Equal inputs must give equal outputs, in the same order, on every run and every replica.
    for (rel, text) in src_files() {
        if !is_core(&rel) || is_test_file(&rel) {
            continue;
        }
        let code = non_test_part(&text);
        for banned in ["HashMap", "HashSet"] {
            assert!(
                !code.contains(banned),
                "{rel}: cores use ordered maps (BTreeMap, BTreeSet), not `{banned}`"
            );
        }
    }
}

#[test]
fn the_codemap_names_every_module() {
    // The crate doc of `src/lib.rs` is the map a newcomer reads first: a module it does not
    // name is one nobody finds. Every name written between backticks counts (`wire`,
    // `tracker::state`, `download` (`picker` ...)).
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let doc: String = lib
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut named = std::collections::BTreeSet::new();
    for (i, span) in doc.split('`').enumerate() {
        if i % 2 == 1 {
            for word in span.split(|c: char| !c.is_alphanumeric() && c != '_') {
                named.insert(word.to_string());
            }
        }
    }
    let mut missing = Vec::new();
    for (rel, text) in src_files() {
        if is_test_file(&rel) || rel.starts_with("bin/") {
            continue;
        }
        // (The whole file: `non_test_part` would stop at `#[cfg(test)] mod testing;`.)
        for line in text.lines() {
            let line = line.trim_start();
            let Some(rest) = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))
                .or_else(|| line.strip_prefix("pub(super) mod "))
                .or_else(|| line.strip_prefix("mod "))
            else {
                continue;
            };
            let Some(name) = rest.strip_suffix(';') else {
                continue;
            };
            if name == "tests" || name.ends_with("_tests") || named.contains(name) {
                continue;
            }
            missing.push(format!("{name} (declared in {rel})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the codemap in src/lib.rs does not name these modules: {missing:?}"
    );
}
