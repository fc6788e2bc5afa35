//! What both binaries' `main` does around their commands: logging to
//! stderr (level from `TIDEMARK_LOG`, default info) and one-line errors
//! with a non-zero exit.

use std::process::ExitCode;

/// Sets up logging to stderr.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Exit status for a command's result; an error is printed as one line,
/// `error: ` followed by the error and its causes.
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_fit_on_one_line() {
        assert_eq!(super::one_line("a\n  b: c\n"), "a b: c");
    }
}
