//! Prerequisite checks that fail (never skip) when the machine cannot run a test.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::bail;

/// Errors unless the effective user is root (loop devices, tracefs, mounts).
pub fn require_root() -> anyhow::Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "this test needs root (effective uid is {euid}): loop devices and tracefs \
             cannot be used otherwise; run the end-to-end tests as root"
        );
    }
    Ok(())
}

/// Errors unless `name` is an executable on `PATH` (or, if it contains a `/`,
/// an executable at that path).
pub fn require_cmd(name: &str) -> anyhow::Result<()> {
    match find_cmd(name) {
        Some(_) => Ok(()),
        None => bail!(
            "required command `{name}` was not found on PATH ({}); install it \
             (Debian: see `apt-cache search {name}`)",
            std::env::var("PATH").unwrap_or_default()
        ),
    }
}

/// The full path of the executable `name`, searched like a shell does.
pub(crate) fn find_cmd(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    let path_var = std::env::var_os("PATH")?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_rejects_nonsense() {
        require_cmd("sh").expect("sh is on every PATH");
        let err = require_cmd("tidemark-no-such-command-xyz").unwrap_err();
        assert!(err.to_string().contains("tidemark-no-such-command-xyz"));
        assert!(find_cmd("/bin/sh").is_some());
        assert!(find_cmd("/nonexistent/sh").is_none());
    }
}
