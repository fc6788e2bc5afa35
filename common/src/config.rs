//! Loading TOML configuration files with errors that name the file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}; check the path given with --config", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {} is not valid: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Reads and parses a TOML file into `T`. Unknown keys are rejected by the
/// callers' `deny_unknown_fields`, so a typo never silently means a default.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message spans several lines with a caret diagram; keep it on one.
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// Resolves `p` against the directory holding the config file, so configs
/// can name their certificates relative to themselves.
pub fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(p)
    }
}

/// The rule for both daemons' `metrics_listen`: the endpoint has no
/// authentication, so it binds to loopback unless the operator says
/// otherwise with `metrics_allow_remote = true`.
pub fn check_metrics_listen(
    listen: Option<std::net::SocketAddr>,
    allow_remote: bool,
) -> Result<(), String> {
    match listen {
        Some(a) if !a.ip().is_loopback() && !allow_remote => Err(format!(
            "metrics_listen = \"{a}\" is not a loopback address and the metrics endpoint has no authentication; use 127.0.0.1:PORT, or set metrics_allow_remote = true"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
    }

    #[test]
    fn errors_name_the_file_on_one_line() {
        let dir = std::env::temp_dir().join(format!("tdm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let p = dir.join("bad.toml");
        std::fs::write(&p, "name = 1\nother = 2\n").expect("write");
        let err = load_toml::<Sample>(&p).expect_err("must fail").to_string();
        assert!(err.contains("bad.toml"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let missing = load_toml::<Sample>(&dir.join("nope.toml")).expect_err("must fail");
        assert!(missing.to_string().contains("nope.toml"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn resolve_is_relative_to_config() {
        assert_eq!(
            resolve(Path::new("/etc/tidemark/agent.toml"), Path::new("ca.pem")),
            PathBuf::from("/etc/tidemark/ca.pem")
        );
        assert_eq!(
            resolve(Path::new("/etc/x.toml"), Path::new("/abs/ca.pem")),
            PathBuf::from("/abs/ca.pem")
        );
    }

    #[test]
    fn metrics_listen_stays_local_unless_allowed() {
        let local = "127.0.0.1:9464".parse().ok();
        let remote = "0.0.0.0:9464".parse().ok();
        assert!(check_metrics_listen(None, false).is_ok());
        assert!(check_metrics_listen(local, false).is_ok());
        assert!(check_metrics_listen(remote, true).is_ok());
        let e = check_metrics_listen(remote, false).expect_err("refused");
        assert!(
            e.contains("0.0.0.0:9464") && e.contains("metrics_allow_remote") && !e.contains('\n'),
            "{e}"
        );
    }
}
