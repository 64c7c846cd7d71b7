//! The house's structure: host/src has no import cycles, and ARCHITECTURE.md's code map names
//! every file in it.

use std::path::{Path, PathBuf};

use weir_tests::structure::{Structure, shown};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn described(cycles: &[Vec<Vec<String>>]) -> String {
    cycles
        .iter()
        .map(|cycle| {
            cycle
                .iter()
                .map(|m| shown(m))
                .collect::<Vec<_>>()
                .join(" -> ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn host_src_has_no_import_cycles() {
    let structure = Structure::read(&workspace().join("host/src")).unwrap();
    assert!(
        structure.files.len() > 50,
        "read {} files",
        structure.files.len()
    );
    let cycles = structure.cycles();
    assert!(
        cycles.is_empty(),
        "host/src has import cycles; move the shared item into a lower file (ARCHITECTURE.md \
         says which layer may import which):\n{}",
        described(&cycles)
    );
}

/// Writes `files` (path, text) under a new temporary directory.
fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

#[test]
fn the_cycle_check_finds_a_cycle_through_a_folders_reexports_and_not_its_own_face() {
    // Two files that import each other are a cycle.
    let plain = tree(&[
        ("lib.rs", "mod a;\nmod b;\n"),
        ("a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "b.rs",
            "pub struct B;\nfn f() -> crate::a::A { crate::a::A }\n",
        ),
    ]);
    let cycles = Structure::read(plain.path()).unwrap().cycles();
    assert_eq!(described(&cycles), "a -> b -> a");

    // A folder's mod.rs that re-exports its files and lends them a shared type is their face,
    // not a cycle; but a file that reaches back to an importer through the face is.
    let faced = tree(&[
        ("lib.rs", "pub mod x;\npub mod y;\n"),
        (
            "x/mod.rs",
            "mod inner;\npub use self::inner::T;\npub struct Shared;\n",
        ),
        (
            "x/inner.rs",
            "use super::Shared;\npub struct T(Shared);\n// use crate::y::Y; is a comment\nconst S: &str = \"crate::y::Y\";\n",
        ),
        ("y.rs", "use crate::x::T;\npub struct Y(T);\n"),
    ]);
    let structure = Structure::read(faced.path()).unwrap();
    assert!(structure.cycles().is_empty(), "{:?}", structure.imports);
    let looped = tree(&[
        ("lib.rs", "pub mod x;\npub mod y;\n"),
        ("x/mod.rs", "mod inner;\npub use self::inner::T;\n"),
        ("x/inner.rs", "pub struct T(crate::y::Y);\n"),
        ("y.rs", "use crate::x::T;\npub struct Y(Box<T>);\n"),
    ]);
    let cycles = Structure::read(looped.path()).unwrap().cycles();
    assert_eq!(described(&cycles), "x/inner -> y -> x/inner");
}

/// Every `host/src/...rs` path named in `text`.
fn named_paths(text: &str) -> std::collections::BTreeSet<String> {
    let mut named = std::collections::BTreeSet::new();
    for (at, _) in text.match_indices("host/src/") {
        let rest = &text[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '.' | '-')))
            .unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches('.');
        if path.ends_with(".rs") {
            named.insert(path.to_owned());
        }
    }
    named
}

#[test]
fn architecture_md_names_every_file_of_host_src_and_no_other() {
    let root = workspace();
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let named = named_paths(&map);
    let structure = Structure::read(&root.join("host/src")).unwrap();
    let mut files: Vec<String> = structure
        .files
        .values()
        .map(|path| {
            let relative = path.strip_prefix(&root).unwrap_or(path);
            relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    files.push("host/src/main.rs".to_owned());
    let missing: Vec<&String> = files.iter().filter(|f| !named.contains(*f)).collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map does not name these files; add a line for each: {missing:?}"
    );
    let stale: Vec<&String> = named.iter().filter(|n| !files.contains(n)).collect();
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names files that do not exist; update the map: {stale:?}"
    );
    assert!(
        std::fs::read_to_string(root.join("host/src/lib.rs"))
            .unwrap()
            .contains("ARCHITECTURE.md"),
        "lib.rs's //! points newcomers to ARCHITECTURE.md"
    );
}
