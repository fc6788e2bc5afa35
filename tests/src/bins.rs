//! Paths of this workspace's binaries, built on first use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Binaries already built by this test process, by name.
static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Variables cargo sets for one package's build or test run (besides the
/// `CARGO_PKG_*` and `CARGO_BIN_EXE_*` families), per the Cargo book's
/// "Environment variables Cargo sets for crates".
const PER_PACKAGE_ENV: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
}

/// The target directory: `CARGO_TARGET_DIR` if set (relative to the
/// workspace root when relative), else the one this test binary was built
/// into (`<target>/debug/deps/<test>`), else `<workspace root>/target`.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return workspace_root().join(dir);
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        let profile = deps.parent()?;
        (deps.file_name()? == "deps" && profile.file_name()? == "debug")
            .then(|| profile.parent().map(Path::to_path_buf))
            .flatten()
    });
    from_exe.unwrap_or_else(|| workspace_root().join("target"))
}

/// The path of the workspace binary `name` (`tidemark-agent`,
/// `tidemark-receiver`) in `<target>/debug`.
///
/// The first call for a name in a test process runs
/// `cargo build -p <name> --bin <name>` (the crate is named like its binary),
/// so the tests never run a stale binary left from an earlier build; later
/// calls return the path at once. Builds are serialised by a mutex.
///
/// # Panics
/// If the build fails (the panic message carries cargo's output) or leaves
/// no binary behind.
pub fn workspace_bin(name: &str) -> PathBuf {
    built(name, &["--bin", name], name)
}

/// The fault-injecting preload library (`tests/faultfs`), built like
/// [`workspace_bin`]: pass it to a process as `LD_PRELOAD`.
pub fn faultfs_library() -> PathBuf {
    built("tidemark-faultfs", &["--lib"], "libtidemark_faultfs.so")
}

/// Builds `package` with `what` (target selection) once per test process
/// and returns `<target>/debug/<file>`.
fn built(package: &str, what: &[&str], file: &str) -> PathBuf {
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(file) {
        return path.clone();
    }

    let target = target_dir();
    let path = target.join("debug").join(file);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", package])
        .args(what)
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target);
    // Cargo sets these for the test process; build scripts that track them
    // (ring tracks CARGO_MANIFEST_DIR) would otherwise see a change and
    // rebuild half the tree here and again in the next outer `cargo build`.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if PER_PACKAGE_ENV.contains(&key)
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(key);
        }
    }
    let command = format!("cargo build -p {package} {}", what.join(" "));
    let output = cmd
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cargo:?} for `{command}`: {err}"));
    if !output.status.success() {
        panic!(
            "{command} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        path.is_file(),
        "{command} succeeded but {} does not exist",
        path.display()
    );
    built.insert(file.to_owned(), path.clone());
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_holds_the_workspace_manifest() {
        let manifest =
            std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("root manifest");
        assert!(manifest.contains("[workspace]"));
        assert!(target_dir().is_dir(), "{}", target_dir().display());
    }
}
