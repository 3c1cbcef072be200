//! The container's OCI spec as the host gives it, turned into the spec the
//! guest runs: the rootfs and every bind mount point into the pod's shared
//! directory (which reaches the guest through kata-virtiofsd), host-only
//! parts (namespace paths, the network namespace, hooks) are dropped.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

/// Where the guest mounts the pod's shared directory (Kata's path).
pub const GUEST_SHARE: &str = "/run/kata-containers/shared/containers";

/// The CRI annotations that group containers into pods.
pub mod cri {
    /// `sandbox` or `container`.
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    /// The pod's sandbox id, on every container of a pod.
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
}

/// Which pod a container belongs to, from its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It owns a pod of its own: a CRI sandbox container, or a container
    /// without CRI annotations (`ctr run`). The pod's id is the container's.
    Owner,
    /// It joins the pod of the CRI sandbox `sandbox_id`.
    Member {
        /// The pod.
        sandbox_id: String,
    },
}

/// The role of a container with this spec and id.
pub fn role(spec: &Spec) -> Role {
    let ann = spec.annotations().as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).map(String::as_str);
    match (get(cri::CONTAINER_TYPE), get(cri::SANDBOX_ID)) {
        (Some("container"), Some(sid)) if !sid.is_empty() => Role::Member {
            sandbox_id: sid.to_string(),
        },
        _ => Role::Owner,
    }
}

/// The pod id for a container, as `start` needs it before any state exists:
/// the CRI sandbox id of a pod member, else the container's own id.
pub fn pod_id(spec: &Spec, container_id: &str) -> String {
    match role(spec) {
        Role::Member { sandbox_id } => sandbox_id,
        Role::Owner => container_id.to_string(),
    }
}

/// A host path bind-mounted into the shared directory for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareMount {
    /// The host source.
    pub source: PathBuf,
    /// Where it goes, relative to the container's directory in the share.
    pub relative: PathBuf,
    /// Bind read-only on the host too (not only in the guest).
    pub readonly: bool,
}

/// What [`to_guest`] made of a spec.
#[derive(Debug)]
pub struct GuestSpec {
    /// The spec the agent gets.
    pub spec: Spec,
    /// The host binds to make below `<share>/<container id>/`.
    pub mounts: Vec<ShareMount>,
    /// Mounts left out (host devices and kernel filesystems), with why.
    pub dropped: Vec<String>,
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// The directory of container `id` in the guest's view of the share, which
/// the guest mounts at `share` ([`GUEST_SHARE`] in a VM).
pub fn guest_container_dir(share: &Path, id: &str) -> PathBuf {
    share.join(id)
}

/// Rewrites `spec` of container `id` for the guest. The rootfs is expected at
/// `<share>/<id>/rootfs`, bind sources at `<share>/<id>/mounts/<n>`.
pub fn to_guest(mut spec: Spec, id: &str, share: &Path) -> Result<GuestSpec, String> {
    let dir = guest_container_dir(share, id);
    let readonly_root = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(dir.join("rootfs"));
    root.set_readonly(Some(readonly_root));
    spec.set_root(Some(root));
    // the host's systemd form (`slice:prefix:name`) names a host unit: the
    // guest has no systemd, the agent picks its own cgroupfs path instead
    if let Some(linux) = spec.linux().as_ref() {
        let path = linux.cgroups_path().as_ref();
        if path.is_some_and(|p| p.to_string_lossy().contains(':')) {
            let mut linux = linux.clone();
            linux.set_cgroups_path(None);
            spec.set_linux(Some(linux));
        }
    }

    let mut mounts = Vec::new();
    let mut dropped = Vec::new();
    let mut out = Vec::new();
    for (n, m) in spec
        .mounts()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        if !is_bind(&m) {
            out.push(m);
            continue;
        }
        let Some(source) = m.source().clone() else {
            return Err(format!(
                "mount {}: a bind mount needs a source",
                m.destination().display()
            ));
        };
        if !source.is_absolute() {
            return Err(format!(
                "mount {}: the bind source {} must be an absolute host path",
                m.destination().display(),
                source.display()
            ));
        }
        if ["/dev", "/proc", "/sys"]
            .iter()
            .any(|p| source == Path::new(p) || source.starts_with(format!("{p}/")))
            && !source.starts_with("/dev/shm")
        {
            dropped.push(format!(
                "{} (host {} does not cross into the VM)",
                m.destination().display(),
                source.display()
            ));
            continue;
        }
        let readonly = m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "ro"));
        let name = source
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let relative = PathBuf::from("mounts").join(format!("{n}-{name}"));
        let mut g = m.clone();
        g.set_source(Some(dir.join(&relative)));
        g.set_typ(Some("bind".into()));
        out.push(g);
        mounts.push(ShareMount {
            source,
            relative,
            readonly,
        });
    }
    spec.set_mounts(Some(out));

    if let Some(linux) = spec.linux_mut() {
        // namespace paths name host namespaces, the network is the VM's own
        if let Some(ns) = linux.namespaces().clone() {
            let kept = ns
                .into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .map(|mut n| {
                    n.set_path(None);
                    n
                })
                .collect();
            linux.set_namespaces(Some(kept));
        }
    }
    // OCI hooks name host programs; they are not run in the guest
    spec.set_hooks(None);
    Ok(GuestSpec {
        spec,
        mounts,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "source": "/var/lib/x/hosts", "options": ["bind", "rw"]},
                {"destination": "/dev/kvm", "type": "bind", "source": "/dev/kvm", "options": ["bind"]}
            ],
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/x"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"}
            ]},
            "hooks": {"prestart": [{"path": "/usr/bin/true"}]}
        })
    }

    #[test]
    fn rootfs_and_binds_point_into_the_share() {
        let g = to_guest(spec(base()), "c1", Path::new(GUEST_SHARE)).unwrap();
        let root = g.spec.root().as_ref().unwrap();
        assert_eq!(
            root.path(),
            &guest_container_dir(Path::new(GUEST_SHARE), "c1").join("rootfs")
        );
        assert_eq!(root.readonly(), Some(true));
        let ms = g.spec.mounts().as_ref().unwrap();
        assert_eq!(ms.len(), 3, "{ms:?}");
        assert_eq!(
            ms[1].source().as_deref(),
            Some(
                guest_container_dir(Path::new(GUEST_SHARE), "c1")
                    .join("mounts/1-data")
                    .as_path()
            )
        );
        assert_eq!(ms[2].typ().as_deref(), Some("bind"));
        assert_eq!(
            g.mounts,
            vec![
                ShareMount {
                    source: "/srv/data".into(),
                    relative: "mounts/1-data".into(),
                    readonly: true
                },
                ShareMount {
                    source: "/var/lib/x/hosts".into(),
                    relative: "mounts/2-hosts".into(),
                    readonly: false
                },
            ]
        );
        assert_eq!(g.dropped.len(), 1, "{:?}", g.dropped);
        assert!(g.spec.hooks().is_none());
        let ns = g
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert_eq!(ns.len(), 2);
        assert!(ns.iter().all(|n| n.path().is_none()));
    }

    #[test]
    fn a_host_systemd_cgroups_path_stays_on_the_host() {
        let cg = |p: &str| {
            let mut j = base();
            j["linux"]["cgroupsPath"] = p.into();
            let g = to_guest(spec(j), "c1", Path::new(GUEST_SHARE)).unwrap();
            let linux = g.spec.linux().clone().unwrap();
            linux.cgroups_path().clone()
        };
        assert_eq!(cg("kubepods.slice:cri-containerd:c1"), None);
        assert_eq!(cg("/default/c1"), Some("/default/c1".into()));
    }

    #[test]
    fn relative_bind_sources_are_refused() {
        let mut j = base();
        j["mounts"][1]["source"] = "data".into();
        let e = to_guest(spec(j), "c1", Path::new(GUEST_SHARE)).unwrap_err();
        assert!(e.contains("/data") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn pods_from_cri_annotations() {
        let mut j = base();
        assert_eq!(role(&spec(j.clone())), Role::Owner);
        assert_eq!(pod_id(&spec(j.clone()), "c1"), "c1");
        j["annotations"] = serde_json::json!({
            cri::CONTAINER_TYPE: "container",
            cri::SANDBOX_ID: "pod1"
        });
        assert_eq!(pod_id(&spec(j.clone()), "c2"), "pod1");
        j["annotations"][cri::CONTAINER_TYPE] = "sandbox".into();
        assert_eq!(role(&spec(j)), Role::Owner);
    }
}
