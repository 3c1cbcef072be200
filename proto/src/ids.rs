//! The identifiers every program checks the same way: a sandbox id, a
//! container id, an exec id. One rule (containerd's, with Kata's length
//! limit): 1 to 128 characters from `[A-Za-z0-9_.-]`, starting with a letter
//! or digit. So an id is always a safe single path component (no `/`, not
//! `.` or `..`, no leading dot) and a safe cgroup and unit name.
//!
//! The shim checks the ids containerd gives it, the launcher its `--id`, the
//! agent the ids in each request: all with [`check`], through the newtypes.

use std::fmt;

/// The longest id accepted.
pub const MAX_LEN: usize = 128;

/// Why an id was refused: what it was for, the id, and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {id:?} is not a valid id: {reason}")]
pub struct IdError {
    /// `sandbox id`, `container id`, `exec id`.
    pub what: &'static str,
    /// As given (cut to 160 characters).
    pub id: String,
    /// Which part of the rule it breaks.
    pub reason: &'static str,
}

/// Checks `id` (named `what` in the error) against the rule above.
pub fn check(what: &'static str, id: &str) -> Result<(), IdError> {
    let err = |reason| IdError {
        what,
        id: id.chars().take(160).collect(),
        reason,
    };
    if id.is_empty() || id.len() > MAX_LEN {
        return Err(err("it must be 1 to 128 characters long"));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(err("it must start with a letter or a digit"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(err("it may only hold letters, digits, '_', '-' and '.'"));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// What the id names, in errors.
            pub const WHAT: &'static str = $what;

            /// Checks `id` and wraps it.
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                check($what, &id)?;
                Ok(Self(id))
            }

            /// The id.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(
    /// A sandbox (pod) id: the name of its run directory, its cgroups, its
    /// log lines' `sandbox_id`.
    SandboxId,
    "sandbox id"
);
id_type!(
    /// A container id.
    ContainerId,
    "container id"
);
id_type!(
    /// An exec (extra process) id.
    ExecId,
    "exec id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for ok in ["a", "abc-1_2.x", "0", &"x".repeat(128), "pod.v1-2"] {
            assert!(SandboxId::new(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "1 to 128"),
            (&*"x".repeat(129), "1 to 128"),
            ("../etc", "start with"),
            (".hidden", "start with"),
            ("-flag", "start with"),
            ("a/b", "only hold"),
            ("a b", "only hold"),
            ("é", "start with"),
            ("a\n", "only hold"),
        ] {
            let e = ContainerId::new(bad).unwrap_err();
            assert!(e.reason.contains(why), "{bad:?}: {e}");
            assert_eq!(e.what, "container id");
            assert!(e.to_string().starts_with("container id "), "{e}");
        }
        let e = "x/y".parse::<ExecId>().unwrap_err();
        assert_eq!(e.what, ExecId::WHAT);
        let id: String = SandboxId::new("p1").unwrap().into();
        assert_eq!(id, "p1");
    }
}
