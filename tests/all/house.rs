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
