//! Per-pod changes through Kata's `io.katacontainers.config.*` annotations.
//!
//! The rule (see docs/configuration.md, "Annotations"):
//! * every `io.katacontainers.config.hypervisor.<key>` annotation needs `<key>`
//!   to fully match one of `[hypervisor.qemu] enable_annotations` (regular
//!   expressions), as in Kata; path values must also match the `valid_*_paths`
//!   globs of that key;
//! * `io.katacontainers.config.agent.<key>` and the runtime keys that only
//!   change the guest are always allowed, as in Kata;
//! * the runtime keys that loosen host-side confinement or grow host logs
//!   (`sandbox_cgroup_only`, `disable_new_netns`, `enable_debug`) need their
//!   name in `enable_annotations` too: kata-rs is stricter than Kata there;
//! * an `io.katacontainers.config.*` key kata-rs does not know is an error, never
//!   ignored; other annotations are not looked at.
//!
//! Annotations are applied in key order on a copy, which is validated after
//! each one; the configuration changes only if all of them are accepted.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::de::value::{Error as ValueError, StrDeserializer};
use serde::de::DeserializeOwned;

use super::{check_kernel_module, is_clean_absolute, vcpus_from_f64, Config, ConfigError};

/// Prefix of every configuration annotation.
pub const ANNOTATION_PREFIX: &str = "io.katacontainers.config.";
/// Prefix of the `[hypervisor.qemu]` annotations.
pub const HYPERVISOR_ANNOTATION_PREFIX: &str = "io.katacontainers.config.hypervisor.";
/// Prefix of the `[agent.kata]` annotations.
pub const AGENT_ANNOTATION_PREFIX: &str = "io.katacontainers.config.agent.";
/// Prefix of the `[runtime]` annotations.
pub const RUNTIME_ANNOTATION_PREFIX: &str = "io.katacontainers.config.runtime.";

/// The hypervisor keys an annotation may set (all need `enable_annotations`).
/// `default_max_vcpus` is Kata's annotation name of `default_maxvcpus`.
const HYPERVISOR_KEYS: &[&str] = &[
    "default_vcpus",
    "default_maxvcpus",
    "default_max_vcpus",
    "default_memory",
    "default_maxmemory",
    "memory_slots",
    "pcie_root_port",
    "kernel_params",
    "machine_type",
    "path",
    "kernel",
    "initrd",
    "shared_fs",
    "virtio_fs_daemon",
    "virtio_fs_cache",
    "virtio_fs_cache_size",
    "virtio_fs_extra_args",
    "enable_debug",
];

/// The agent keys an annotation may set (always allowed).
const AGENT_KEYS: &[&str] = &[
    "enable_debug",
    "debug_console_enabled",
    "dial_timeout",
    "kernel_modules",
    "enable_tracing",
    "policy",
];

/// The runtime keys an annotation may set without `enable_annotations`.
const RUNTIME_KEYS: &[&str] = &[
    "disable_guest_seccomp",
    "internetworking_model",
    "experimental",
    "enable_pprof",
];

/// The runtime keys an annotation may set only if `enable_annotations` names them.
const RUNTIME_RESTRICTED_KEYS: &[&str] =
    &["sandbox_cgroup_only", "disable_new_netns", "enable_debug"];

/// kata-virtiofsd options an annotation may add (`virtio_fs_extra_args`);
/// those ending in `=` take a value.
const VIRTIOFSD_ANNOTATION_ARGS: &[&str] = &[
    "--thread-pool-size=",
    "--xattr",
    "--announce-submounts",
    "--readonly",
];

/// The annotation that sets key `key` of `section` (`hypervisor.qemu`,
/// `agent.kata`, `runtime`) and the rule it is under, or `None` when no
/// annotation sets it.
pub(crate) fn annotation_rule(section: &str, key: &str) -> Option<(String, &'static str)> {
    let (prefix, rule) = match section {
        "hypervisor.qemu" if HYPERVISOR_KEYS.contains(&key) => (
            HYPERVISOR_ANNOTATION_PREFIX,
            "only if `enable_annotations` matches the key",
        ),
        "agent.kata" if AGENT_KEYS.contains(&key) => (AGENT_ANNOTATION_PREFIX, "always allowed"),
        "runtime" if RUNTIME_KEYS.contains(&key) => (RUNTIME_ANNOTATION_PREFIX, "always allowed"),
        "runtime" if RUNTIME_RESTRICTED_KEYS.contains(&key) => (
            RUNTIME_ANNOTATION_PREFIX,
            "only if `enable_annotations` names the key",
        ),
        _ => return None,
    };
    Some((format!("{prefix}{key}"), rule))
}

/// Which section an annotation belongs to.
#[derive(Clone, Copy)]
enum Section {
    Hypervisor,
    Agent,
    Runtime,
}

/// What went wrong setting one key.
enum Problem {
    /// The value does not parse: what was expected.
    Value(String),
    /// A path refused by the globs: why.
    Path(String),
}

impl Config {
    /// Applies Kata's configuration annotations of a pod (see the module
    /// documentation for the rule). On error the configuration is unchanged.
    pub fn apply_annotations(
        &mut self,
        annotations: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        let mut keys: Vec<&String> = annotations
            .keys()
            .filter(|k| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        keys.sort();
        let mut next = self.clone();
        for annotation in keys {
            let value = &annotations[annotation];
            let unknown = || ConfigError::UnknownAnnotation {
                annotation: annotation.clone(),
            };
            let rest = &annotation[ANNOTATION_PREFIX.len()..];
            let (section, key) = rest.split_once('.').ok_or_else(unknown)?;
            let (section, restricted) = match section {
                "hypervisor" if HYPERVISOR_KEYS.contains(&key) => (Section::Hypervisor, true),
                "agent" if AGENT_KEYS.contains(&key) => (Section::Agent, false),
                "runtime" if RUNTIME_KEYS.contains(&key) => (Section::Runtime, false),
                "runtime" if RUNTIME_RESTRICTED_KEYS.contains(&key) => (Section::Runtime, true),
                _ => return Err(unknown()),
            };
            if restricted && !self.annotation_enabled(key) {
                return Err(ConfigError::AnnotationNotAllowed {
                    annotation: annotation.clone(),
                    key: key.into(),
                    config: self.source_display(),
                });
            }
            let set = match section {
                Section::Hypervisor => set_hypervisor(&mut next, key, value),
                Section::Agent => set_agent(&mut next, key, value),
                Section::Runtime => set_runtime(&mut next, key, value),
            };
            match set {
                Ok(()) => {}
                Err(Problem::Value(expected)) => {
                    return Err(ConfigError::BadAnnotation {
                        annotation: annotation.clone(),
                        value: shortened(value),
                        expected,
                    })
                }
                Err(Problem::Path(reason)) => {
                    return Err(ConfigError::AnnotationPathNotAllowed {
                        annotation: annotation.clone(),
                        value: value.clone(),
                        reason,
                    })
                }
            }
            next.validate()
                .map_err(|problem| ConfigError::AnnotationInvalid {
                    annotation: annotation.clone(),
                    problem: Box::new(problem),
                })?;
        }
        *self = next;
        Ok(())
    }

    /// Whether `key` fully matches one of `enable_annotations`.
    fn annotation_enabled(&self, key: &str) -> bool {
        self.hypervisor
            .qemu
            .enable_annotations
            .iter()
            .any(|re| full_match(re, key))
    }
}

/// Whether the regular expression matches the whole of `s` (an invalid
/// expression matches nothing; [`Config::validate`] refuses them).
fn full_match(re: &str, s: &str) -> bool {
    regex_lite::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(s))
}

fn set_hypervisor(cfg: &mut Config, key: &str, v: &str) -> Result<(), Problem> {
    let globs_of = |cfg: &Config, list: &str| -> Vec<String> {
        let q = &cfg.hypervisor.qemu;
        match list {
            "valid_hypervisor_paths" => q.valid_hypervisor_paths.clone(),
            _ => q.valid_virtio_fs_daemon_paths.clone(),
        }
    };
    let source = cfg.source_display();
    let q = &mut cfg.hypervisor.qemu;
    match key {
        "default_vcpus" => {
            q.default_vcpus = v
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(vcpus_from_f64)
                .ok_or_else(|| expected("a number of vCPUs (a fraction is rounded up)"))?
        }
        "default_maxvcpus" | "default_max_vcpus" => q.default_maxvcpus = uint(v)?,
        "default_memory" => q.default_memory = uint(v)?,
        "default_maxmemory" => q.default_maxmemory = uint(v)?,
        "memory_slots" => q.memory_slots = uint(v)?,
        "pcie_root_port" => q.pcie_root_port = uint(v)?,
        "virtio_fs_cache_size" => q.virtio_fs_cache_size = uint(v)?,
        "enable_debug" => q.enable_debug = boolean(v)?,
        "kernel_params" => {
            let extra = v.trim();
            if extra.chars().any(char::is_control) {
                return Err(expected("kernel parameters without control characters"));
            }
            if !extra.is_empty() {
                q.kernel_params = format!("{} {extra}", q.kernel_params).trim().to_string();
            }
        }
        "machine_type" => q.machine_type = v.to_string(),
        "shared_fs" => q.shared_fs = variant(v)?,
        "virtio_fs_cache" => q.virtio_fs_cache = variant(v)?,
        "kernel" => q.kernel = clean_path(v)?,
        "initrd" => q.initrd = clean_path(v)?,
        "path" => {
            let p = clean_path(v)?;
            let globs = globs_of(cfg, "valid_hypervisor_paths");
            allowed_path(&p, "valid_hypervisor_paths", &globs, &source)?;
            cfg.hypervisor.qemu.path = p;
        }
        "virtio_fs_daemon" => {
            let p = clean_path(v)?;
            let globs = globs_of(cfg, "valid_virtio_fs_daemon_paths");
            allowed_path(&p, "valid_virtio_fs_daemon_paths", &globs, &source)?;
            cfg.hypervisor.qemu.virtio_fs_daemon = p;
        }
        "virtio_fs_extra_args" => {
            let args: Vec<String> = serde_json::from_str(v)
                .map_err(|_| expected("a JSON list of strings, e.g. [\"--thread-pool-size=1\"]"))?;
            if let Some(bad) = args.iter().find(|a| !annotation_virtiofsd_arg(a)) {
                return Err(expected(&format!(
                    "kata-virtiofsd options among {} ({bad:?} is not one)",
                    VIRTIOFSD_ANNOTATION_ARGS
                        .iter()
                        .map(|a| if a.ends_with('=') {
                            format!("{a}N")
                        } else {
                            a.to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            q.virtio_fs_extra_args.extend(args);
        }
        _ => unreachable!("annotation key {key} is listed in HYPERVISOR_KEYS"),
    }
    Ok(())
}

fn set_agent(cfg: &mut Config, key: &str, v: &str) -> Result<(), Problem> {
    let a = &mut cfg.agent.kata;
    match key {
        "enable_debug" => a.enable_debug = boolean(v)?,
        "debug_console_enabled" => a.debug_console_enabled = boolean(v)?,
        "enable_tracing" => a.enable_tracing = boolean(v)?,
        "dial_timeout" => a.dial_timeout = uint(v)?,
        "policy" => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .map_err(|e| expected(&format!("the agent policy (Rego) as base64 ({e})")))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                expected("the agent policy (Rego) as base64 of UTF-8 text (it decodes to binary)")
            })?;
            if text.trim().is_empty() {
                return Err(expected(
                    "the agent policy (Rego) as base64 (it decodes to nothing)",
                ));
            }
            a.policy = Some(text);
        }
        "kernel_modules" => {
            let modules: Vec<String> = v
                .split(';')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            if modules.iter().any(|m| check_kernel_module(m).is_err()) {
                return Err(expected(
                    "a ;-separated list of `module [param=value ...]`, e.g. \"e1000e EEE=1; i915\"",
                ));
            }
            a.kernel_modules = modules;
        }
        _ => unreachable!("annotation key {key} is listed in AGENT_KEYS"),
    }
    Ok(())
}

fn set_runtime(cfg: &mut Config, key: &str, v: &str) -> Result<(), Problem> {
    let r = &mut cfg.runtime;
    match key {
        "disable_guest_seccomp" => r.disable_guest_seccomp = boolean(v)?,
        "sandbox_cgroup_only" => r.sandbox_cgroup_only = boolean(v)?,
        "disable_new_netns" => r.disable_new_netns = boolean(v)?,
        "enable_debug" => r.enable_debug = boolean(v)?,
        "enable_pprof" => r.enable_pprof = boolean(v)?,
        "internetworking_model" => r.internetworking_model = variant(v)?,
        "experimental" => r.experimental = v.split_whitespace().map(String::from).collect(),
        _ => unreachable!("annotation key {key} is listed in RUNTIME_KEYS"),
    }
    Ok(())
}

/// A value as an error message shows it: at most 64 characters (a policy
/// annotation may be megabytes).
fn shortened(v: &str) -> String {
    match v.char_indices().nth(64) {
        Some((i, _)) => format!("{}... ({} bytes)", &v[..i], v.len()),
        None => v.to_string(),
    }
}

fn expected(what: &str) -> Problem {
    Problem::Value(what.to_string())
}

/// Go's `strconv.ParseBool`, as Kata.
fn boolean(v: &str) -> Result<bool, Problem> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(expected("a boolean (true or false)")),
    }
}

fn uint<T: std::str::FromStr>(v: &str) -> Result<T, Problem> {
    v.trim()
        .parse()
        .map_err(|_| expected("an unsigned integer"))
}

/// One of an enum's configuration names.
fn variant<T: DeserializeOwned>(v: &str) -> Result<T, Problem> {
    T::deserialize(StrDeserializer::<ValueError>::new(v)).map_err(|e| {
        let msg = e.to_string();
        // serde: "unknown variant `x`, expected one of `a`, `b`"
        let names = msg.split_once("expected ").map_or(msg.as_str(), |(_, n)| n);
        Problem::Value(names.to_string())
    })
}

/// An absolute path without `.` or `..` components.
fn clean_path(v: &str) -> Result<PathBuf, Problem> {
    let p = PathBuf::from(v);
    if is_clean_absolute(&p) {
        Ok(p)
    } else {
        Err(expected("an absolute path without . or .. components"))
    }
}

/// A path some glob of `list` matches.
fn allowed_path(
    p: &std::path::Path,
    list: &str,
    globs: &[String],
    source: &str,
) -> Result<(), Problem> {
    let s = p.to_string_lossy();
    if globs.is_empty() {
        return Err(Problem::Path(format!(
            "hypervisor.qemu.{list} is empty in {source}: no annotation may choose this path"
        )));
    }
    if globs.iter().any(|g| glob_match(g, &s)) {
        Ok(())
    } else {
        Err(Problem::Path(format!(
            "does not match hypervisor.qemu.{list} = {globs:?} in {source}"
        )))
    }
}

/// Whether an annotation may add this kata-virtiofsd option.
fn annotation_virtiofsd_arg(a: &str) -> bool {
    VIRTIOFSD_ANNOTATION_ARGS
        .iter()
        .any(|allowed| match allowed.strip_suffix('=') {
            Some(opt) => a
                .strip_prefix(opt)
                .and_then(|r| r.strip_prefix('='))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            None => a == *allowed,
        })
}

/// One element of a glob.
#[derive(Debug)]
enum Tok {
    /// This character.
    Lit(char),
    /// `?`: any one character but `/`.
    One,
    /// `*`: any run of characters without `/`.
    Star,
    /// `[...]`: one character (not `/`) in (or, negated, not in) the ranges.
    Class(bool, Vec<(char, char)>),
}

/// Shell glob matching as `glob(3)` without the file system: `*` and `?` do
/// not match `/`, `[a-z]` and `[!a-z]` classes, `\` escapes. A malformed
/// class (no closing `]`) is taken literally.
pub(crate) fn glob_match(pattern: &str, s: &str) -> bool {
    let toks = tokenize(pattern);
    let s: Vec<char> = s.chars().collect();
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        let step = match toks.get(t) {
            Some(Tok::Star) => {
                star = Some((t, i));
                t += 1;
                continue;
            }
            Some(Tok::Lit(c)) => *c == s[i],
            Some(Tok::One) => s[i] != '/',
            Some(Tok::Class(neg, ranges)) => {
                s[i] != '/' && (ranges.iter().any(|(a, b)| (*a..=*b).contains(&s[i])) != *neg)
            }
            None => false,
        };
        if step {
            t += 1;
            i += 1;
            continue;
        }
        // Let the last `*` take one more character, if it may.
        match star {
            Some((st, si)) if s[si] != '/' => {
                star = Some((st, si + 1));
                t = st + 1;
                i = si + 1;
            }
            _ => return false,
        }
    }
    toks[t..].iter().all(|k| matches!(k, Tok::Star))
}

fn tokenize(pattern: &str) -> Vec<Tok> {
    let p: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::One),
            '\\' if i + 1 < p.len() => {
                i += 1;
                toks.push(Tok::Lit(p[i]));
            }
            '[' => {
                if let Some((tok, end)) = class(&p, i) {
                    toks.push(tok);
                    i = end;
                } else {
                    toks.push(Tok::Lit('['));
                }
            }
            c => toks.push(Tok::Lit(c)),
        }
        i += 1;
    }
    toks
}

/// The class starting at `p[start] == '['`, and the index of its `]`.
fn class(p: &[char], start: usize) -> Option<(Tok, usize)> {
    let mut i = start + 1;
    let neg = matches!(p.get(i), Some('!' | '^'));
    if neg {
        i += 1;
    }
    let mut ranges = Vec::new();
    let first = i;
    while i < p.len() {
        let c = p[i];
        if c == ']' && i > first {
            return Some((Tok::Class(neg, ranges), i));
        }
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|e| *e != ']') {
            ranges.push((c, p[i + 2]));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests;
