//! The cgroup of a pod on the host: what `linux.cgroupsPath` of the pod's
//! sandbox container names (containerd and the kubelet set it), in the
//! two forms runc and Kata accept.
//!
//! * `slice:prefix:name` (e.g. `kubepods-besteffort-pod1.slice:cri-containerd:abc`):
//!   systemd's. The pod's cgroup is the scope `prefix-name.scope` in the slice
//!   (`-` in a slice name nests it: `a-b.slice` lives in `a.slice`).
//! * a path (relative or absolute): cgroupfs, below each hierarchy's root
//!   (as runc reads it).
//!
//! Every form is checked when the container is created, before anything is
//! made: no `.` or `..` components, slice, prefix and name as systemd allows
//! them. A bad path is an error naming it; the pod is left as it was.

use std::path::PathBuf;

/// A pod's cgroup as the spec names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPath {
    /// Managed through cgroupfs: the path below each hierarchy's root.
    Fs(PathBuf),
    /// Managed through systemd: a transient scope in a slice.
    Systemd {
        /// The slice (`-.slice` for the root slice when empty).
        slice: String,
        /// The scope's prefix (e.g. `cri-containerd`).
        prefix: String,
        /// The scope's name (e.g. the pod id).
        name: String,
    },
}

/// Why a cgroups path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cgroupsPath {input:?}: {reason}")]
pub struct CgroupPathError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

fn unit_chars_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:\\@".contains(&b))
}

impl CgroupPath {
    /// Parses and checks `s`.
    pub fn parse(s: &str) -> Result<CgroupPath, CgroupPathError> {
        let bad = |reason: &str| CgroupPathError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() == 3 && !s.contains('/') {
            let (slice, prefix, name) = (parts[0], parts[1], parts[2]);
            if !slice.is_empty() {
                let stem = slice.strip_suffix(".slice").unwrap_or("");
                if stem.is_empty()
                    || !unit_chars_ok(slice)
                    || slice.contains(':')
                    || (slice != "-.slice"
                        && (stem.starts_with('-') || stem.ends_with('-') || stem.contains("--")))
                {
                    return Err(bad(
                        "the slice must be a systemd slice name ending in .slice (letters, digits, -_.), e.g. kubepods-besteffort.slice",
                    ));
                }
            }
            if name.is_empty()
                || !unit_chars_ok(name)
                || name.contains(':')
                || (!prefix.is_empty() && (!unit_chars_ok(prefix) || prefix.contains(':')))
            {
                return Err(bad(
                    "the scope's prefix and name must be letters, digits and -_.",
                ));
            }
            return Ok(CgroupPath::Systemd {
                slice: slice.into(),
                prefix: prefix.into(),
                name: name.into(),
            });
        }
        if s.contains(':') {
            return Err(bad(
                "a systemd path is slice:prefix:name (three parts, no /)",
            ));
        }
        let mut rel = PathBuf::new();
        for part in s.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." {
                return Err(bad("no '.' or '..' components"));
            }
            rel.push(part);
        }
        if rel.as_os_str().is_empty() {
            return Err(bad("the root cgroup is not a pod's"));
        }
        Ok(CgroupPath::Fs(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_containerd_and_the_kubelet_give() {
        assert_eq!(
            CgroupPath::parse("/kata-rs-test/pod1").unwrap(),
            CgroupPath::Fs("kata-rs-test/pod1".into())
        );
        assert_eq!(
            CgroupPath::parse("kubepods/besteffort/pod1/abc").unwrap(),
            CgroupPath::Fs("kubepods/besteffort/pod1/abc".into())
        );
        assert_eq!(
            CgroupPath::parse("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            CgroupPath::Systemd {
                slice: "kubepods-besteffort-pod1.slice".into(),
                prefix: "cri-containerd".into(),
                name: "abc".into()
            }
        );
        assert!(matches!(
            CgroupPath::parse(":cri-containerd:abc"),
            Ok(CgroupPath::Systemd { .. })
        ));
        assert!(CgroupPath::parse("-.slice:kata:abc").is_ok());
    }

    #[test]
    fn bad_paths_are_refused_with_the_reason() {
        for bad in [
            "",
            "/",
            "../escape",
            "/kubepods/../../etc",
            "a/./b",
            "a:b",
            "a:b:c:d",
            "kubepods.slice/x:p:n",
            "kubepods:cri-containerd:abc",
            "kube--pods.slice:p:n",
            "-kube.slice:p:n",
            "kube-.slice:p:n",
            ".slice:p:n",
            "bad slice.slice:p:n",
            "k.slice:p:",
            "k.slice:p:n/../x",
            "k.slice:p q:n",
        ] {
            let e = CgroupPath::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("cgroupsPath"), "{e}");
        }
        let e = CgroupPath::parse("kubepods:cri-containerd:abc").unwrap_err();
        assert!(e.to_string().contains(".slice"), "{e}");
    }
}
