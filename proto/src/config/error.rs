//! [`ConfigError`]: every way the configuration, or an annotation changing
//! it, can be wrong, naming the file (when known), the key or annotation and
//! the problem.

use std::path::PathBuf;

/// Why a configuration could not be loaded, changed or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable).
    #[error("configuration {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a configuration: a TOML syntax error, an unknown section or key,
    /// a value of the wrong type.
    #[error("{}{}", in_file(.file), keyed(.key, .problem))]
    Parse {
        /// Which file (`None`: text, not a file).
        file: Option<PathBuf>,
        /// The key at fault, e.g. `hypervisor.qemu.default_memory` (`None`:
        /// a syntax error, located in `problem`).
        key: Option<String>,
        /// What is wrong.
        problem: String,
    },
    /// A value of the right type that is refused (range, name, path form).
    #[error("{}{key} = {value}: {problem}", in_file(.file))]
    BadValue {
        /// Which file (`None`: text, not a file).
        file: Option<PathBuf>,
        /// The key, e.g. `hypervisor.qemu.default_memory`.
        key: String,
        /// The value as written (strings quoted).
        value: String,
        /// What is wrong.
        problem: String,
    },
    /// A file the configuration names is missing or of the wrong kind.
    #[error("{key} = {path:?}: {problem}")]
    MissingFile {
        /// The key naming it.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A helper program left empty in the configuration and not found.
    #[error("{key} is empty and {name} is neither next to {beside} nor in $PATH")]
    HelperNotFound {
        /// The key, e.g. `hypervisor.qemu.launcher`.
        key: String,
        /// The program's file name.
        name: String,
        /// Where it was looked for first (the running program).
        beside: String,
    },
    /// Several problems, all reported (`; `-separated).
    #[error("{}", join(.0))]
    Several(Vec<ConfigError>),
    /// An `io.katacontainers.config.*` key kata-rs does not support.
    #[error("annotation {annotation} is not supported by kata-rs")]
    UnknownAnnotation {
        /// The annotation key.
        annotation: String,
    },
    /// A restricted key whose name `enable_annotations` does not match.
    #[error(
        "annotation {annotation} is not allowed: add \"{key}\" to enable_annotations in {config} ([hypervisor.qemu])"
    )]
    AnnotationNotAllowed {
        /// The annotation key.
        annotation: String,
        /// Its name after the prefix, what `enable_annotations` must match.
        key: String,
        /// The configuration file.
        config: String,
    },
    /// An annotation value that does not parse.
    #[error("annotation {annotation} = {value:?}: expected {expected}")]
    BadAnnotation {
        /// The annotation key.
        annotation: String,
        /// Its value.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// An annotation path the configuration does not allow.
    #[error("annotation {annotation} = {value:?}: {reason}")]
    AnnotationPathNotAllowed {
        /// The annotation key.
        annotation: String,
        /// The path asked for.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// An annotation value that parses but leaves the configuration invalid.
    #[error("annotation {annotation}: {problem}")]
    AnnotationInvalid {
        /// The annotation key.
        annotation: String,
        /// The validation error (names the configuration key).
        problem: Box<ConfigError>,
    },
}

impl ConfigError {
    /// `key = value: problem`; `value` shown as written (strings quoted).
    pub(crate) fn bad(
        key: impl Into<String>,
        value: impl std::fmt::Debug,
        problem: impl Into<String>,
    ) -> Self {
        ConfigError::BadValue {
            file: None,
            key: key.into(),
            value: format!("{value:?}"),
            problem: problem.into(),
        }
    }

    /// The same error, naming the file it was found in.
    pub(crate) fn in_file(mut self, path: &std::path::Path) -> Self {
        if let ConfigError::Parse { file, .. } | ConfigError::BadValue { file, .. } = &mut self {
            *file = Some(path.to_path_buf());
        }
        self
    }
}

fn in_file(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|p| format!("configuration {}: ", p.display()))
        .unwrap_or_default()
}

fn keyed(key: &Option<String>, problem: &str) -> String {
    match key {
        Some(k) => format!("{k}: {problem}"),
        None => problem.to_string(),
    }
}

fn join(errors: &[ConfigError]) -> String {
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    all.join("; ")
}
