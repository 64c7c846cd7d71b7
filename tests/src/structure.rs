//! The structure of a crate's source tree as files and the imports between them, read from the
//! text: enough to find import cycles, without a Rust parser.
//!
//! A file is a node. An import is an edge to the file that defines the name, found by following
//! `pub use` re-exports (a folder's `mod.rs` that re-exports its files is their face, not a file
//! in between). `use` lines and inline `crate::`/`super::`/`self::` paths count; a file's
//! `#[cfg(test)] mod tests` does not, since tests are not structure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside the crate: `["upstream", "pool"]` for `upstream/pool.rs`, and `[]` for
/// the crate root.
pub type ModulePath = Vec<String>;

/// The files of a source tree and the imports between them.
#[derive(Debug, Default)]
pub struct Structure {
    /// Each file's module path, with the file it was read from.
    pub files: BTreeMap<ModulePath, PathBuf>,
    /// Who imports whom.
    pub imports: BTreeMap<ModulePath, BTreeSet<ModulePath>>,
}

impl Structure {
    /// Reads every `.rs` file under `root` (a crate's `src/`).
    pub fn read(root: &Path) -> std::io::Result<Structure> {
        let mut sources = BTreeMap::new();
        read_tree(root, root, &mut sources)?;
        let files: BTreeMap<ModulePath, PathBuf> = sources
            .iter()
            .map(|(module, (path, _))| (module.clone(), path.clone()))
            .collect();
        let mut aliases: BTreeMap<ModulePath, BTreeMap<String, ModulePath>> = BTreeMap::new();
        let mut used: BTreeMap<ModulePath, Vec<ModulePath>> = BTreeMap::new();
        for (module, (_, text)) in &sources {
            let text = without_tests_and_comments(text);
            let (reexported, imported) = paths_in(&text);
            let absolute = |path: &[String]| absolute(module, path, &files);
            aliases.insert(
                module.clone(),
                reexported
                    .iter()
                    .filter_map(|(path, alias)| Some((alias.clone(), absolute(path)?)))
                    .collect(),
            );
            used.insert(
                module.clone(),
                imported.iter().filter_map(|path| absolute(path)).collect(),
            );
        }
        let imports = used
            .iter()
            .map(|(module, paths)| {
                let targets = paths
                    .iter()
                    .filter_map(|path| resolve(path, &files, &aliases, 0))
                    .filter(|target| target != module)
                    .collect();
                (module.clone(), targets)
            })
            .collect();
        Ok(Structure { files, imports })
    }

    /// Every import cycle, each as the files in it, in order, the first repeated at the end.
    pub fn cycles(&self) -> Vec<Vec<ModulePath>> {
        let mut cycles = Vec::new();
        let mut done = BTreeSet::new();
        for start in self.files.keys() {
            let mut path = Vec::new();
            self.walk(start, &mut path, &mut done, &mut cycles);
        }
        cycles
    }

    /// Depth-first from `at`, reporting each back edge as the cycle it closes.
    fn walk(
        &self,
        at: &ModulePath,
        path: &mut Vec<ModulePath>,
        done: &mut BTreeSet<ModulePath>,
        cycles: &mut Vec<Vec<ModulePath>>,
    ) {
        if done.contains(at) {
            return;
        }
        if let Some(start) = path.iter().position(|m| m == at) {
            let mut cycle = path[start..].to_vec();
            cycle.push(at.clone());
            cycles.push(cycle);
            return;
        }
        path.push(at.clone());
        for next in self.imports.get(at).into_iter().flatten() {
            self.walk(next, path, done, cycles);
        }
        path.pop();
        done.insert(at.clone());
    }
}

/// A module path as its file reads in a report: `upstream/pool`, or `lib` for the root.
pub fn shown(module: &[String]) -> String {
    if module.is_empty() {
        "lib".to_owned()
    } else {
        module.join("/")
    }
}

fn read_tree(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<ModulePath, (PathBuf, String)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            read_tree(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(root)
                .expect("under root")
                .with_extension("");
            let mut module: ModulePath = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            // The binary's main.rs and the library's lib.rs are both the root; the library
            // is the structure, and the binary only uses it from outside.
            if path.file_name().is_some_and(|n| n == "main.rs") && module.is_empty() {
                continue;
            }
            out.insert(module, (path.clone(), std::fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

/// The text without its inline test module (by convention the file's last item), its comments
/// and the contents of its string literals, so that a path named in a doc or a message is no
/// import.
fn without_tests_and_comments(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => text,
    };
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < bytes.len() {
        let rest = &text[at..];
        if rest.starts_with("//") {
            at += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            at += rest.find("*/").map_or(rest.len(), |end| end + 2);
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = &rest[hashes + 2..];
            at += hashes
                + 2
                + body
                    .find(&close)
                    .map_or(body.len(), |end| end + close.len());
            out.push_str("\"\"");
        } else if rest.starts_with('"') {
            let mut end = 1;
            while end < rest.len() {
                match rest.as_bytes()[end] {
                    b'\\' => end += 2,
                    b'"' => break,
                    _ => end += 1,
                }
            }
            at += end + 1;
            out.push_str("\"\"");
        } else if rest.starts_with("'\"'") {
            at += 3;
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            at += c.len_utf8();
        }
    }
    out
}

/// The number of `#`s of a raw string literal starting here (`r"` or `r#"`), if one does.
fn raw_string_start(text: &str) -> Option<usize> {
    let rest = text.strip_prefix('r')?;
    let hashes = rest.bytes().take_while(|b| *b == b'#').count();
    rest[hashes..].starts_with('"').then_some(hashes)
}

/// The paths a file names: its re-exports (`pub use`, with the name each is known by) and
/// everything else it imports.
#[allow(clippy::type_complexity)]
fn paths_in(text: &str) -> (Vec<(Vec<String>, String)>, Vec<Vec<String>>) {
    let mut reexported = Vec::new();
    let mut imported = Vec::new();
    let mut rest = String::new();
    let mut remaining = text;
    while let Some(at) = find_word(remaining, "use") {
        let before = &remaining[..at];
        let public = before.trim_end().ends_with("pub") || before.trim_end().ends_with(')');
        let Some(end) = remaining[at..].find(';') else {
            break;
        };
        let tree = &remaining[at + 3..at + end];
        for (path, alias) in use_tree(&[], tree) {
            if public {
                reexported.push((path, alias));
            } else {
                imported.push(path);
            }
        }
        rest.push_str(before);
        remaining = &remaining[at + end + 1..];
    }
    rest.push_str(remaining);
    imported.extend(inline_paths(&rest));
    (reexported, imported)
}

/// Where `word` stands alone in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut from = 0;
    while let Some(found) = text[from..].find(word) {
        let at = from + found;
        let end = at + word.len();
        let alone_before = at == 0 || !is_ident(bytes[at - 1]);
        let alone_after = end < bytes.len() && bytes[end].is_ascii_whitespace();
        if alone_before && alone_after {
            return Some(at);
        }
        from = end;
    }
    None
}

/// The paths of a `use` tree such as `a::{b, c::{d as e}}`, each with the name it binds.
fn use_tree(prefix: &[String], tree: &str) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    for item in split_top_level(tree) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if let Some(open) = item.find('{') {
            let close = item.rfind('}').unwrap_or(item.len());
            let mut inner_prefix = prefix.to_vec();
            inner_prefix.extend(segments(item[..open].trim_end_matches(':')));
            out.extend(use_tree(&inner_prefix, &item[open + 1..close]));
        } else {
            let (path, alias) = match item.split_once(" as ") {
                Some((path, alias)) => (path, Some(alias.trim())),
                None => (item, None),
            };
            let mut full = prefix.to_vec();
            full.extend(segments(path));
            let Some(last) = full.last().cloned() else {
                continue;
            };
            // `a::{self}` binds `a`.
            if last == "self" {
                full.pop();
            }
            let name = alias.map(str::to_owned).or_else(|| full.last().cloned());
            if let Some(name) = name {
                out.push((full, name));
            }
        }
    }
    out
}

fn split_top_level(tree: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in tree.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&tree[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(&tree[start..]);
    items
}

fn segments(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Paths outside `use` lines, such as `crate::a::b`, `super::b` or `child::f`: every
/// `name::name` that does not continue another path. Which of them are this crate's is
/// decided by [`absolute`].
fn inline_paths(text: &str) -> Vec<Vec<String>> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let continues = at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b':');
        if continues || !(bytes[at].is_ascii_alphabetic() || bytes[at] == b'_') {
            at += 1;
            continue;
        }
        let mut end = at;
        while end < bytes.len() && (is_ident(bytes[end]) || bytes[end] == b':') {
            end += 1;
        }
        let path: Vec<String> = segments(&text[at..end]).collect();
        if path.len() > 1 {
            out.push(path);
        }
        at = end.max(at + 1);
    }
    out
}

/// `path` as a path from the crate root, seen from `module`; `None` for another crate's.
fn absolute(
    module: &ModulePath,
    path: &[String],
    files: &BTreeMap<ModulePath, PathBuf>,
) -> Option<ModulePath> {
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "super" | "self" => {
            let mut base = module.clone();
            let mut rest = path;
            while let Some(head) = rest.first() {
                match head.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        // A child module named without `self::`.
        child => {
            let mut candidate = module.clone();
            candidate.push(child.to_owned());
            files.contains_key(&candidate).then(|| {
                let mut full = module.clone();
                full.extend(path.iter().cloned());
                full
            })
        }
    }
}

/// The file that defines what `path` names: the deepest file on it, then through that file's
/// re-exports.
fn resolve(
    path: &[String],
    files: &BTreeMap<ModulePath, PathBuf>,
    aliases: &BTreeMap<ModulePath, BTreeMap<String, ModulePath>>,
    depth: usize,
) -> Option<ModulePath> {
    let deepest = (0..=path.len())
        .rev()
        .find(|n| files.contains_key(&path[..*n]))?;
    let file = path[..deepest].to_vec();
    if let Some(name) = path.get(deepest)
        && depth < 16
        && let Some(target) = aliases.get(&file).and_then(|a| a.get(name))
    {
        let mut next = target.clone();
        next.extend(path[deepest + 1..].iter().cloned());
        return resolve(&next, files, aliases, depth + 1);
    }
    Some(file)
}
