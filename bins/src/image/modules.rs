//! Which kernel modules go into the guest image, and in which order the agent
//! loads them: the wanted modules plus everything they depend on, dependencies
//! first, built-in ones left out.
//!
//! Dependencies come from `modules.dep` when the kernel package ships one;
//! Debian's packages do not (depmod runs at install time), so otherwise they are
//! read from each needed module's `.modinfo` section (`depends=`).

use std::collections::{BTreeMap, BTreeSet};

/// Why the module set could not be worked out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModulesError {
    /// A wanted module is neither a module file nor built in.
    #[error(
        "kernel module {0} is neither in the kernel package nor built in; \
         is this a kernel with virtio/vsock support (a Debian *-cloud-amd64 kernel)?"
    )]
    Missing(String),
    /// A module depends on one that does not exist.
    #[error("kernel module {module} depends on {dependency}, which is not in the kernel package")]
    MissingDependency {
        /// The module.
        module: String,
        /// Its missing dependency.
        dependency: String,
    },
    /// The dependencies loop.
    #[error("kernel module dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A `modules.dep` line could not be parsed.
    #[error("modules.dep line {line}: {text:?} is not `path: dep dep...`")]
    BadDepLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// Reading a module's dependencies failed.
    #[error("kernel module {module}: {message}")]
    Read {
        /// The module.
        module: String,
        /// What went wrong.
        message: String,
    },
}

/// Modules the guest needs, in a sensible load order.
pub const REQUIRED: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "fuse",
    "virtiofs",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "overlay",
];

/// Modules taken when the kernel has them. None today: virtio-scsi,
/// virtio-rng and evdev were, but no kata-rs VM has a SCSI controller, an
/// RNG or an input device, and their five module files cost the Debian
/// kernel's boot about 70 ms under TCG (scsi_mod alone 40 ms).
pub const OPTIONAL: &[&str] = &[];

/// A module's name from its file path: `kernel/x/rng-core.ko.xz` → `rng_core`.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// One module file and its direct dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleNode {
    /// Path relative to `/lib/modules/<kver>/` as found in the package
    /// (possibly compressed).
    pub path: String,
    /// Names of the modules it needs.
    pub deps: Vec<String>,
}

/// Parses `modules.dep` (`kernel/a.ko: kernel/b.ko kernel/c.ko`) into nodes by name.
pub fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, ModuleNode>, ModulesError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((path, deps)) = line.split_once(':') else {
            return Err(ModulesError::BadDepLine {
                line: i + 1,
                text: line.into(),
            });
        };
        let path = path.trim();
        if path.is_empty() || !path.contains(".ko") {
            return Err(ModulesError::BadDepLine {
                line: i + 1,
                text: line.into(),
            });
        }
        let deps = deps.split_whitespace().map(name_of).collect();
        out.insert(
            name_of(path),
            ModuleNode {
                path: path.to_string(),
                deps,
            },
        );
    }
    Ok(out)
}

/// Module names listed in `modules.builtin` (one path per line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(name_of)
        .collect()
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolution {
    /// Modules to ship, dependencies first.
    pub load_order: Vec<ModuleNode>,
    /// Wanted modules that are built into the kernel.
    pub builtin: Vec<String>,
    /// Optional modules this kernel does not have.
    pub absent_optional: Vec<String>,
}

/// Works out the modules to ship for `required` and `optional` wanted modules.
/// `lookup(name)` gives a module's file and dependencies, or `None` when there
/// is no such module file.
pub fn resolve(
    required: &[&str],
    optional: &[&str],
    builtin: &BTreeSet<String>,
    mut lookup: impl FnMut(&str) -> Result<Option<ModuleNode>, ModulesError>,
) -> Result<Resolution, ModulesError> {
    let mut res = Resolution::default();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let wanted = required
        .iter()
        .map(|n| (n, true))
        .chain(optional.iter().map(|n| (n, false)));
    for (name, is_required) in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            res.builtin.push(name);
            continue;
        }
        if done.contains(&name) {
            continue;
        }
        let Some(node) = lookup(&name)? else {
            if is_required {
                return Err(ModulesError::Missing(name));
            }
            res.absent_optional.push(name);
            continue;
        };
        let mut stack = vec![name.clone()];
        visit(
            node,
            &mut stack,
            &mut done,
            builtin,
            &mut lookup,
            &mut res.load_order,
        )?;
    }
    Ok(res)
}

fn visit(
    node: ModuleNode,
    stack: &mut Vec<String>,
    done: &mut BTreeSet<String>,
    builtin: &BTreeSet<String>,
    lookup: &mut impl FnMut(&str) -> Result<Option<ModuleNode>, ModulesError>,
    out: &mut Vec<ModuleNode>,
) -> Result<(), ModulesError> {
    for dep in &node.deps {
        if done.contains(dep) || builtin.contains(dep) {
            continue;
        }
        if let Some(pos) = stack.iter().position(|s| s == dep) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(dep.clone());
            return Err(ModulesError::Cycle(cycle));
        }
        let module = stack.last().cloned().unwrap_or_default();
        let child = lookup(dep)?.ok_or_else(|| ModulesError::MissingDependency {
            module,
            dependency: dep.clone(),
        })?;
        stack.push(dep.clone());
        visit(child, stack, done, builtin, lookup, out)?;
        stack.pop();
    }
    if let Some(name) = stack.last() {
        done.insert(name.clone());
    }
    out.push(node);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/fs/fuse/fuse.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/char/hw_random/rng-core.ko.xz
";

    fn lookup_in(
        map: &BTreeMap<String, ModuleNode>,
    ) -> impl FnMut(&str) -> Result<Option<ModuleNode>, ModulesError> + '_ {
        |n| Ok(map.get(n).cloned())
    }

    fn names(r: &Resolution) -> Vec<String> {
        r.load_order.iter().map(|m| name_of(&m.path)).collect()
    }

    #[test]
    fn parses_and_orders_dependencies_first() {
        let map = parse_modules_dep(DEP).unwrap();
        assert_eq!(map["virtio_rng"].deps, ["rng_core"]);
        assert_eq!(
            map["virtio_pci"].path,
            "kernel/drivers/virtio/virtio_pci.ko.xz"
        );
        let r = resolve(
            &["virtio_pci", "virtiofs"],
            &["evdev"],
            &BTreeSet::new(),
            lookup_in(&map),
        )
        .unwrap();
        let order = names(&r);
        assert_eq!(
            order,
            [
                "virtio_pci_modern_dev",
                "virtio",
                "virtio_ring",
                "virtio_pci",
                "fuse",
                "virtiofs"
            ]
        );
        assert_eq!(r.absent_optional, ["evdev"]);
        // Every module comes after all of its dependencies.
        for (i, m) in r.load_order.iter().enumerate() {
            for d in &m.deps {
                assert!(order[..i].contains(d), "{d} must precede {}", order[i]);
            }
        }
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let map = parse_modules_dep(DEP).unwrap();
        let builtin = parse_builtin("kernel/drivers/virtio/virtio.ko\nkernel/fs/fuse/fuse.ko\n");
        let r = resolve(&["virtiofs", "fuse"], &[], &builtin, lookup_in(&map)).unwrap();
        assert_eq!(names(&r), ["virtio_ring", "virtiofs"]);
        assert_eq!(r.builtin, ["fuse"]);
    }

    #[test]
    fn missing_and_cycles_are_errors() {
        let map = parse_modules_dep(DEP).unwrap();
        let e = resolve(&["nope"], &[], &BTreeSet::new(), lookup_in(&map)).unwrap_err();
        assert_eq!(e, ModulesError::Missing("nope".into()));
        assert!(e.to_string().contains("nope"));
        let e = resolve(&[], &["virtio_rng"], &BTreeSet::new(), lookup_in(&map)).unwrap_err();
        assert_eq!(
            e,
            ModulesError::MissingDependency {
                module: "virtio_rng".into(),
                dependency: "rng_core".into()
            }
        );
        let cyc = parse_modules_dep("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n").unwrap();
        let e = resolve(&["a"], &[], &BTreeSet::new(), lookup_in(&cyc)).unwrap_err();
        assert_eq!(
            e,
            ModulesError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        let self_loop = parse_modules_dep("a.ko: a.ko\n").unwrap();
        assert!(matches!(
            resolve(&["a"], &[], &BTreeSet::new(), lookup_in(&self_loop)),
            Err(ModulesError::Cycle(_))
        ));
    }

    #[test]
    fn bad_dep_lines() {
        assert!(matches!(
            parse_modules_dep("no colon here"),
            Err(ModulesError::BadDepLine { line: 1, .. })
        ));
        assert!(matches!(
            parse_modules_dep("\n: x.ko"),
            Err(ModulesError::BadDepLine { line: 2, .. })
        ));
        assert_eq!(name_of("kernel/a/rng-core.ko.zst"), "rng_core");
    }
}
