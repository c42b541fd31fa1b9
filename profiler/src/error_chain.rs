//! An error with its causes on one line, for logs and checks that print it themselves.

/// An error and its causes on one line, `outer: inner: ...` (as `anyhow` prints them).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
