//! Builds every plugin component for wasm32-wasip2, and the proxy-wasm filters in tests/filters
//! (core modules: Rust ones for wasm32-wasip1, and one in AssemblyScript), and writes their paths
//! into `plugins.rs`.
//!
//! The tests never use checked-in .wasm files: this runs nested `cargo build`s into their own
//! target folders (so they do not wait on the outer build's lock), and the tests `include!` the
//! generated constants.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
/// What the Rust proxy-wasm filters are built for: proxy-wasm filters are core modules.
const FILTER_TARGET: &str = "wasm32-wasip1";
/// The Rust proxy-wasm filters (tests/filters is a cargo workspace of its own), each with the
/// constant that holds its path.
const FILTERS: [(&str, &str); 6] = [
    ("filter-http-headers", "FILTER_HTTP_HEADERS"),
    ("filter-http-body", "FILTER_HTTP_BODY"),
    ("filter-http-auth-random", "FILTER_HTTP_AUTH_RANDOM"),
    ("filter-http-config", "FILTER_HTTP_CONFIG"),
    ("filter-hello-world", "FILTER_HELLO_WORLD"),
    ("weir-filter", "FILTER_WEIR"),
];

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf();
    let members = plugin_crates(&workspace);
    // Cargo.toml and Cargo.lock change when a plugin crate is added or removed, or a plugin's
    // dependencies change; the rest is what the components are built from.
    let sources = [
        "Cargo.toml",
        "Cargo.lock",
        "wit",
        "sdk",
        "plugins/python-example/app.py",
        "plugins/python-example/chunks.py",
        "plugins/js-example/app.js",
        "plugins/js-example/chunks.js",
        "plugins/js-example/package.json",
    ];
    let folders = members.iter().map(|member| member.folder.clone());
    for path in sources
        .iter()
        .map(|path| workspace.join(path))
        .chain(folders)
    {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for path in filter_sources(&workspace) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("proto").display()
    );
    // The gRPC service the tonic tests run behind weir.
    tonic_prost_build::configure()
        .compile_protos(
            &[manifest.join("proto/echo.proto")],
            &[manifest.join("proto")],
        )
        .expect("compiling tests/proto/echo.proto (protoc: apt-get install protobuf-compiler)");

    let packages: Vec<&str> = members
        .iter()
        .filter(|member| member.component)
        .map(|member| member.name.as_str())
        .collect();
    let release = build(&workspace, "wasm-plugins", &packages, &[]);
    // A second build of probe that answers differently, for module swaps and rollbacks. It has
    // its own target folder, so neither build invalidates the other.
    let variant_b = build(
        &workspace,
        "wasm-plugins-b",
        &["probe"],
        &[("PROBE_VARIANT", "b")],
    );

    let mut components: Vec<(&str, &Path, String)> = packages
        .iter()
        .map(|package| (*package, release.as_path(), constant(package)))
        .collect();
    components.push(("probe", variant_b.as_path(), "PROBE_B".into()));
    let others = release
        .parent()
        .expect("a release folder")
        .join("languages");
    // The examples' plugins stay on 0.1.0, to show that a plugin built then still loads; their
    // chunk hooks need 0.3.0.
    build_python(&workspace, &others, "app", "0.1.0", "python_example");
    build_python(&workspace, &others, "chunks", "0.3.0", "python_chunks");
    build_javascript(&workspace, &others, "app.js", "0.1.0", "js_example");
    build_javascript(&workspace, &others, "chunks.js", "0.3.0", "js_chunks");
    for package in ["python-example", "python-chunks", "js-example", "js-chunks"] {
        components.push((package, others.as_path(), constant(package)));
    }
    // Each constant: its name, the file, and what the file is.
    let mut built: Vec<(String, PathBuf, String)> = components
        .into_iter()
        .map(|(package, folder, constant)| {
            let file = folder.join(format!("{}.wasm", package.replace('-', "_")));
            (constant, file, format!("The `{package}` component"))
        })
        .collect();

    // The proxy-wasm filters, and a second build of weir-filter that answers `version` with b
    // rather than a, for swaps of one filter's module.
    let filters = build_filters(
        &workspace,
        "wasm-filters",
        &FILTERS.map(|(package, _)| package),
        &[],
    );
    let filters_b = build_filters(
        &workspace,
        "wasm-filters-b",
        &["weir-filter"],
        &["variant-b"],
    );
    for (package, constant) in FILTERS {
        let file = filters.join(format!("{}.wasm", package.replace('-', "_")));
        built.push((
            constant.into(),
            file,
            format!("The `{package}` proxy-wasm filter"),
        ));
    }
    built.push((
        "FILTER_WEIR_B".into(),
        filters_b.join("weir_filter.wasm"),
        "The `weir-filter` proxy-wasm filter built with `--features variant-b`".into(),
    ));
    let assemblyscript = filters
        .parent()
        .and_then(Path::parent)
        .expect("a target folder")
        .join("assemblyscript");
    built.push((
        "FILTER_ASSEMBLYSCRIPT".into(),
        build_assemblyscript(&workspace, &assemblyscript),
        "The AssemblyScript proxy-wasm filter in tests/filters/assemblyscript (ABI 0.2.0)".into(),
    ));

    let mut constants = String::from(
        "// Generated by tests/build.rs: paths of the built plugin components and filters.\n",
    );
    for (constant, file, what) in built {
        if !file.exists() {
            panic!("the build finished but {} is missing", file.display());
        }
        constants.push_str(&format!(
            "/// {what} ({constant}).\npub const {constant}: &str = {:?};\n",
            file.display().to_string()
        ));
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out_dir.join("plugins.rs"), constants).expect("writing plugins.rs");
}

/// A workspace crate in plugins/ or tests/plugins/.
struct PluginCrate {
    /// The package name, which names its .wasm file and its constant.
    name: String,
    /// The folder its Cargo.toml is in.
    folder: PathBuf,
    /// Whether it builds a component (a `cdylib`), rather than a library plugins share.
    component: bool,
}

/// The workspace's plugin crates, as `cargo metadata` sees them, so that the workspace's
/// `members` is the one list of plugins.
fn plugin_crates(workspace: &Path) -> Vec<PluginCrate> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .expect("running cargo metadata");
    if !output.status.success() {
        panic!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let folders = [
        workspace.join("plugins"),
        workspace.join("tests").join("plugins"),
    ];
    let mut crates: Vec<PluginCrate> = metadata["packages"]
        .as_array()
        .expect("cargo metadata lists packages")
        .iter()
        .filter_map(|package| {
            let manifest = PathBuf::from(package["manifest_path"].as_str()?);
            let folder = manifest.parent()?.to_path_buf();
            if !folders
                .iter()
                .any(|plugins| folder.parent() == Some(plugins.as_path()))
            {
                return None;
            }
            let component = package["targets"].as_array()?.iter().any(|target| {
                target["crate_types"]
                    .as_array()
                    .is_some_and(|types| types.iter().any(|t| t == "cdylib"))
            });
            Some(PluginCrate {
                name: package["name"].as_str()?.to_owned(),
                folder,
                component,
            })
        })
        .collect();
    crates.sort_by(|a, b| a.name.cmp(&b.name));
    crates
}

/// The name of the constant that holds `package`'s path: `request-id` is `REQUEST_ID`.
fn constant(package: &str) -> String {
    package.replace('-', "_").to_uppercase()
}

/// Builds `packages` for wasm32-wasip2 in release into `target/<folder>`, and returns the
/// folder that holds the .wasm files.
fn build(workspace: &Path, folder: &str, packages: &[&str], env: &[(&str, &str)]) -> PathBuf {
    let target_dir = workspace.join("target").join(folder);
    let mut command = nested_cargo(workspace);
    command
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for package in packages {
        command.args(["-p", package]);
    }
    command.envs(env.iter().copied());
    let status = command
        .status()
        .expect("running cargo to build the plugin components");
    if !status.success() {
        panic!(
            "building the plugin components for {TARGET} failed (see the output above).\n\
             If the target is missing, install it with:  rustup target add {TARGET}"
        );
    }
    target_dir.join(TARGET).join("release")
}

/// A `cargo` command run from `workspace`, without the outer build's settings.
fn nested_cargo(workspace: &Path) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace);
    // The outer build's settings (clippy's wrapper, host rustflags, coverage) must not leak in.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    command
}

/// What the proxy-wasm filters are built from: tests/filters' workspace, its crates, and the
/// AssemblyScript filter's sources and lock file (not its node_modules or a build/ of its own).
fn filter_sources(workspace: &Path) -> Vec<PathBuf> {
    let filters = workspace.join("tests").join("filters");
    let assemblyscript = filters.join("assemblyscript");
    let mut sources = vec![
        filters.join("Cargo.toml"),
        filters.join("Cargo.lock"),
        assemblyscript.join("assembly"),
        assemblyscript.join("package.json"),
        assemblyscript.join("package-lock.json"),
    ];
    let entries = std::fs::read_dir(&filters).expect("reading tests/filters");
    for entry in entries {
        let folder = entry.expect("reading tests/filters").path();
        if folder.join("Cargo.toml").is_file() {
            sources.push(folder);
        }
    }
    sources.sort();
    sources
}

/// Builds `packages` of tests/filters' workspace for wasm32-wasip1 in release, with `features`,
/// into `target/<folder>`, and returns the folder that holds the .wasm files.
fn build_filters(workspace: &Path, folder: &str, packages: &[&str], features: &[&str]) -> PathBuf {
    if installed(FILTER_TARGET) == Some(false) {
        panic!(
            "the Rust toolchain has no {FILTER_TARGET} target: the tests build proxy-wasm filters \
             for it.\nInstall it with:  rustup target add {FILTER_TARGET}   (or run ./.ci/run)"
        );
    }
    let target_dir = workspace.join("target").join(folder);
    let mut command = nested_cargo(workspace);
    command
        .args(["build", "--release", "--manifest-path"])
        .arg(workspace.join("tests").join("filters").join("Cargo.toml"))
        .args(["--target", FILTER_TARGET, "--target-dir"])
        .arg(&target_dir);
    for package in packages {
        command.args(["-p", package]);
    }
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    let status = command
        .status()
        .expect("running cargo to build the proxy-wasm filters");
    if !status.success() {
        panic!(
            "building the proxy-wasm filters in tests/filters for {FILTER_TARGET} failed (see the \
             output above).\nIf the target is missing, install it with:  rustup target add \
             {FILTER_TARGET}"
        );
    }
    target_dir.join(FILTER_TARGET).join("release")
}

/// Whether the toolchain's standard library for `target` is installed: None if rustc cannot
/// say (then the build's own error tells).
fn installed(target: &str) -> Option<bool> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let libdir = String::from_utf8(output.stdout).ok()?;
    Some(Path::new(libdir.trim()).is_dir())
}

/// Builds tests/filters/assemblyscript with its pinned AssemblyScript compiler (from its
/// package.json) into `out/filter.wasm`, and returns that path.
fn build_assemblyscript(workspace: &Path, out: &Path) -> PathBuf {
    let folder = workspace
        .join("tests")
        .join("filters")
        .join("assemblyscript");
    let asc = folder.join("node_modules").join(".bin").join("asc");
    if !asc.exists() {
        panic!(
            "AssemblyScript is not installed: the tests build a proxy-wasm filter with it.\n\
             Install it with:  (cd tests/filters/assemblyscript && npm ci)   (or run ./.ci/run)"
        );
    }
    std::fs::create_dir_all(out).expect("creating the output folder");
    let file = out.join("filter.wasm");
    // As @solo-io/proxy-runtime's README says: its abort hook logs the message, then exits.
    let status = Command::new(&asc)
        .current_dir(&folder)
        .args([
            "assembly/index.ts",
            "--use",
            "abort=abort_proc_exit",
            "--optimize",
        ])
        .arg("-b")
        .arg(&file)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("asc failed ({status}) building tests/filters/assemblyscript"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("asc could not start: it runs on Node.js (apt-get install nodejs npm)")
        }
        Err(e) => panic!("running asc: {e}"),
    }
    file
}

/// The componentize-py version the tests and .ci/run use.
const COMPONENTIZE_PY: &str = "0.25.1";

/// Builds module `module` of plugins/python-example with componentize-py, against world
/// `world`, into `out/<name>.wasm`.
fn build_python(workspace: &Path, out: &Path, module: &str, world: &str, name: &str) {
    std::fs::create_dir_all(out).expect("creating the output folder");
    let status = Command::new("componentize-py")
        .current_dir(workspace)
        .args(["-d", "wit", "-w"])
        .arg(format!("weir:plugin/plugin@{world}"))
        .args(["componentize", "-p", "plugins/python-example", module, "-o"])
        .arg(out.join(format!("{name}.wasm")))
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("componentize-py failed ({status}) building plugins/python-example"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "componentize-py is not installed: the tests build a Python plugin with it.\n\
             Install it with:  pip install componentize-py=={COMPONENTIZE_PY}   (or run ./.ci/run)"
        ),
        Err(e) => panic!("running componentize-py: {e}"),
    }
}

/// Builds `file` of plugins/js-example with componentize-js (from its package.json), against
/// world `world`, into `out/<name>.wasm`.
fn build_javascript(workspace: &Path, out: &Path, file: &str, world: &str, name: &str) {
    let folder = workspace.join("plugins").join("js-example");
    let tool = folder
        .join("node_modules")
        .join(".bin")
        .join("componentize-js");
    if !tool.exists() {
        panic!(
            "componentize-js is not installed: the tests build a JavaScript plugin with it.\n\
             Install it with:  (cd plugins/js-example && npm ci)   (or run ./.ci/run)"
        );
    }
    std::fs::create_dir_all(out).expect("creating the output folder");
    let status = Command::new(tool)
        .current_dir(&folder)
        .args([file, "--wit", "../../wit", "--world-name"])
        .arg(format!("weir:plugin/plugin@{world}"))
        .args(["--disable", "http", "fetch-event", "-o"])
        .arg(out.join(format!("{name}.wasm")))
        .status()
        .expect("running componentize-js");
    if !status.success() {
        panic!("componentize-js failed ({status}) building plugins/js-example");
    }
}
