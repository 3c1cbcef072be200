//! `kata-ctl check`: can this host run kata-rs pods?
//!
//! One line per check: `ok`, `warn` (pods run, but something is slower or
//! missing) or `FAIL` (pods cannot run). kata-rs makes no network checks: there
//! is no release check to skip, so `--no-network-checks` changes nothing.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use kata_proto::config::Config;

use crate::image::{self, cpio, manifest::Manifest};

/// Why the checks could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Writing the report failed.
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
}

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Pods run, with a caveat.
    Warn,
    /// Pods cannot run.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Status.
    pub status: Status,
    /// What was checked.
    pub name: &'static str,
    /// One-line summary.
    pub summary: String,
    /// Shown with `--verbose`.
    pub details: Vec<String>,
}

impl Outcome {
    fn new(status: Status, name: &'static str, summary: impl Into<String>) -> Self {
        Self {
            status,
            name,
            summary: summary.into(),
            details: Vec::new(),
        }
    }

    fn detail(mut self, d: impl Into<String>) -> Self {
        self.details.push(d.into());
        self
    }

    /// The report line(s).
    pub fn render(&self, verbose: bool) -> String {
        let mut s = format!("{:<6}{}: {}\n", self.status, self.name, self.summary);
        if verbose {
            for d in &self.details {
                s.push_str(&format!("        {d}\n"));
            }
        }
        s
    }
}

/// Runs every check and prints the report; `Ok(false)` when the host cannot run pods.
pub fn run(config: Option<&Path>, verbose: bool) -> Result<bool, CheckError> {
    let mut outcomes = Vec::new();
    let cfg = match Config::discover(config) {
        Ok(c) => {
            let src = config
                .map(|p| p.display().to_string())
                .or_else(|| std::env::var("KATA_CONF_FILE").ok())
                .or_else(|| {
                    kata_proto::config::SEARCH_PATHS
                        .iter()
                        .find(|p| Path::new(p).exists())
                        .map(|p| p.to_string())
                })
                .unwrap_or_else(|| "built-in defaults (no configuration file)".into());
            outcomes.push(Outcome::new(Status::Ok, "config", src));
            c
        }
        Err(e) => {
            outcomes.push(Outcome::new(Status::Fail, "config", e.to_string()));
            Config::default()
        }
    };
    let q = &cfg.hypervisor.qemu;
    outcomes.push(check_qemu(&q.path));
    outcomes.push(check_kvm(&q.accelerator));
    outcomes.push(check_vsock());
    outcomes.push(check_dev(
        "fuse",
        "/dev/fuse",
        Status::Fail,
        "virtio-fs shares need it: `modprobe fuse`",
    ));
    outcomes.push(check_cgroups());
    outcomes.push(check_dev(
        "tun/tap",
        "/dev/net/tun",
        Status::Warn,
        "pods get no network: `modprobe tun`",
    ));
    outcomes.push(check_vhost_net());
    let kconfig = KernelConfig::load();
    outcomes.push(check_kernel_features(
        "macvtap",
        &kconfig,
        &[("CONFIG_MACVTAP", "macvtap")],
    ));
    outcomes.push(check_kernel_features(
        "tc",
        &kconfig,
        &[
            ("CONFIG_NET_SCH_INGRESS", "sch_ingress"),
            ("CONFIG_NET_CLS_U32", "cls_u32"),
            ("CONFIG_NET_ACT_MIRRED", "act_mirred"),
        ],
    ));
    outcomes.push(check_guest_image(&q.kernel, &q.initrd));

    let mut out = String::new();
    for o in &outcomes {
        out.push_str(&o.render(verbose));
    }
    let ok = outcomes.iter().all(|o| o.status != Status::Fail);
    out.push_str(if ok {
        "this host can run kata-rs pods\n"
    } else {
        "this host cannot run kata-rs pods: see the FAIL lines\n"
    });
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    Ok(ok)
}

fn check_qemu(path: &Path) -> Outcome {
    let name = "qemu";
    match Command::new(path).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next().unwrap_or("").trim().to_string();
            Outcome::new(Status::Ok, name, format!("{} ({first})", path.display()))
        }
        Ok(out) => Outcome::new(
            Status::Fail,
            name,
            format!("{} --version failed ({})", path.display(), out.status),
        ),
        Err(e) => Outcome::new(
            Status::Fail,
            name,
            format!(
                "{}: {e}; install it (`apt-get install qemu-system-x86`) or set \
                 [hypervisor.qemu] path",
                path.display()
            ),
        ),
    }
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

fn check_kvm(accelerator: &str) -> Outcome {
    let name = "kvm";
    let fallback = if accelerator == "kvm" {
        Status::Fail
    } else {
        Status::Warn
    };
    let tcg = "guests run under TCG (software emulation, several times slower)";
    let f = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            return Outcome::new(fallback, name, format!("/dev/kvm: {e}; {tcg}"))
                .detail(format!("configured accelerator: {accelerator}"));
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number;
    // the fd is a valid open /dev/kvm for the duration of the call.
    let api = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if api != 12 {
        return Outcome::new(
            fallback,
            name,
            format!("/dev/kvm API version {api}, want 12; {tcg}"),
        );
    }
    // SAFETY: KVM_CREATE_VM with machine type 0 returns a new fd or -1; it reads
    // no memory of ours. The returned fd is closed right away.
    let vm = unsafe { libc::ioctl(f.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        let e = std::io::Error::last_os_error();
        return Outcome::new(fallback, name, format!("KVM_CREATE_VM failed: {e}; {tcg}"));
    }
    // SAFETY: `vm` is a file descriptor we own and use nowhere else.
    unsafe { libc::close(vm) };
    if let Some(why) = kata_proto::host::pvm_evidence() {
        return Outcome::new(
            fallback,
            name,
            "/dev/kvm works (API 12, VM creation ok) but is PVM (nested paravirtualisation): \
             a stock guest kernel hangs under it; run guests under TCG (accelerator = \"tcg\"; \
             tests use -accel tcg)",
        )
        .detail(why)
        .detail(format!("configured accelerator: {accelerator}"));
    }
    Outcome::new(Status::Ok, name, "/dev/kvm (API 12, VM creation works)")
        .detail("not a boot test: a guest boot under KVM is the only full proof")
        .detail(format!("configured accelerator: {accelerator}"))
}

fn check_vsock() -> Outcome {
    if Path::new("/dev/vhost-vsock").exists() {
        Outcome::new(Status::Ok, "vsock", "vhost-vsock (/dev/vhost-vsock)")
    } else {
        Outcome::new(
            Status::Ok,
            "vsock",
            "hybrid vsock over vhost-user (no /dev/vhost-vsock; kata-rs's own backend)",
        )
    }
}

/// vhost-net (the kernel serving a NIC's queues): not used by kata-rs yet
/// (the jail would have to expose it), so its absence costs nothing today.
fn check_vhost_net() -> Outcome {
    if Path::new("/dev/vhost-net").exists() {
        Outcome::new(
            Status::Ok,
            "vhost-net",
            "/dev/vhost-net present; not used yet: QEMU's own thread serves the pod's NICs",
        )
    } else {
        Outcome::new(
            Status::Ok,
            "vhost-net",
            "no /dev/vhost-net: QEMU's own thread serves the pod's NICs (kata-rs does not use vhost-net yet)",
        )
    }
}

fn check_dev(name: &'static str, path: &str, missing: Status, hint: &str) -> Outcome {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Outcome::new(Status::Ok, name, path),
        Err(e) => Outcome::new(missing, name, format!("{path}: {e}; {hint}")),
    }
}

/// The cgroup layout seen in a mountinfo text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Only v1 controllers.
    V1,
    /// v1 controllers plus a v2 hierarchy (at the given path).
    Hybrid(String),
    /// Only v2 (at the given path).
    V2(String),
    /// No cgroup file system mounted.
    None,
}

/// Classifies the cgroup mounts of a `/proc/self/mountinfo` text.
pub fn cgroup_layout(mountinfo: &str) -> CgroupLayout {
    let mut v1 = false;
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4).unwrap_or("");
        match right.split_whitespace().next() {
            Some("cgroup2") => v2 = v2.or(Some(mount_point.to_string())),
            Some("cgroup") => v1 = true,
            _ => {}
        }
    }
    match (v1, v2) {
        (true, Some(p)) => CgroupLayout::Hybrid(p),
        (true, None) => CgroupLayout::V1,
        (false, Some(p)) => CgroupLayout::V2(p),
        (false, None) => CgroupLayout::None,
    }
}

fn check_cgroups() -> Outcome {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match cgroup_layout(&text) {
        CgroupLayout::V1 => Outcome::new(Status::Ok, "cgroups", "v1"),
        CgroupLayout::Hybrid(p) => Outcome::new(
            Status::Ok,
            "cgroups",
            format!("hybrid (v1 controllers, v2 at {p})"),
        ),
        CgroupLayout::V2(p) => Outcome::new(Status::Ok, "cgroups", format!("v2 at {p}")),
        CgroupLayout::None => {
            Outcome::new(Status::Fail, "cgroups", "no cgroup file system mounted")
        }
    }
}

/// The running kernel's configuration, where it could be read.
#[derive(Debug, Clone, Default)]
pub struct KernelConfig {
    /// Where it came from.
    pub source: Option<String>,
    /// `CONFIG_X=value` lines.
    pub text: String,
}

impl KernelConfig {
    fn load() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(out) = Command::new("gzip")
            .args(["-dc", "/proc/config.gz"])
            .output()
        {
            if out.status.success() {
                return Self {
                    source: Some("/proc/config.gz".into()),
                    text: String::from_utf8_lossy(&out.stdout).into_owned(),
                };
            }
        }
        let boot = format!("/boot/config-{release}");
        if let Ok(text) = std::fs::read_to_string(&boot) {
            return Self {
                source: Some(boot),
                text,
            };
        }
        Self::default()
    }

    /// `y`, `m` or `None` (not set / unknown).
    pub fn value(&self, key: &str) -> Option<String> {
        self.text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix('='))
                .map(|v| v.trim().to_string())
        })
    }
}

fn module_available(module: &str) -> bool {
    if Path::new("/sys/module").join(module).exists() {
        return true;
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = PathBuf::from("/lib/modules").join(release);
    let alt = module.replace('_', "-");
    std::fs::read_to_string(dir.join("modules.dep")).is_ok_and(|t| {
        t.lines().any(|l| {
            let n = image::modules::name_of(l.split(':').next().unwrap_or(""));
            n == module || n == alt
        })
    })
}

fn check_kernel_features(
    name: &'static str,
    kconfig: &KernelConfig,
    features: &[(&str, &str)],
) -> Outcome {
    let mut missing = Vec::new();
    let mut details = Vec::new();
    for (key, module) in features {
        let state = match kconfig.value(key).as_deref() {
            Some("y") => "built in".to_string(),
            Some("m") if module_available(module) => format!("module {module}"),
            Some("m") => {
                missing.push(*module);
                format!("module {module}, not found under /lib/modules")
            }
            _ if kconfig.source.is_none() && module_available(module) => format!("module {module}"),
            _ if kconfig.source.is_none() => {
                missing.push(*module);
                "unknown (no kernel config readable)".into()
            }
            _ => {
                missing.push(*module);
                "not enabled".into()
            }
        };
        details.push(format!("{key}: {state}"));
    }
    let src = kconfig
        .source
        .clone()
        .unwrap_or_else(|| "/sys/module".into());
    let mut o = if missing.is_empty() {
        Outcome::new(Status::Ok, name, format!("available (from {src})"))
    } else {
        Outcome::new(
            Status::Warn,
            name,
            format!("missing or unknown: {} (from {src})", missing.join(", ")),
        )
    };
    o.details = details;
    o
}

fn check_guest_image(kernel: &Path, initrd: &Path) -> Outcome {
    let name = "guest image";
    let build = "build it with `kata-ctl image build`";
    for f in [kernel, initrd] {
        if !f.is_file() {
            return Outcome::new(
                Status::Fail,
                name,
                format!("{} is missing; {build}", f.display()),
            );
        }
    }
    let dir = initrd.parent().unwrap_or(Path::new("."));
    let mpath = dir.join(image::manifest::FILE);
    if !mpath.exists() {
        return Outcome::new(
            Status::Warn,
            name,
            format!(
                "{} has no manifest.json: not built by kata-ctl, cannot verify",
                dir.display()
            ),
        );
    }
    let m = match Manifest::load(&mpath) {
        Ok(m) => m,
        Err(e) => return Outcome::new(Status::Fail, name, e.to_string()),
    };
    if kernel.parent() != Some(dir)
        || kernel.file_name().is_none_or(|n| n != "vmlinuz")
        || initrd.file_name().is_none_or(|n| n != "initrd.img")
    {
        return Outcome::new(
            Status::Warn,
            name,
            format!(
                "kernel {} and initrd {} are not the vmlinuz/initrd.img of one image directory; \
                 cannot verify them against {}",
                kernel.display(),
                initrd.display(),
                mpath.display()
            ),
        );
    }
    if let Err(e) = image::verify(dir, &m) {
        return Outcome::new(
            Status::Fail,
            name,
            format!("{e}; rebuild with `kata-ctl image build`"),
        );
    }
    match std::fs::read(initrd)
        .map_err(|e| e.to_string())
        .and_then(|b| cpio::parse(&b).map_err(|e| e.to_string()))
    {
        Ok(entries) => {
            for needed in ["init", image::MODULES_LIST, "bin/busybox"] {
                if !entries.iter().any(|e| e.name == needed) {
                    return Outcome::new(
                        Status::Fail,
                        name,
                        format!("{} has no /{needed}; {build}", initrd.display()),
                    );
                }
            }
        }
        Err(e) => {
            return Outcome::new(Status::Fail, name, format!("{}: {e}", initrd.display()));
        }
    }
    let mut o = Outcome::new(
        Status::Ok,
        name,
        format!(
            "{} (kernel {}, agent {}, checksums match)",
            dir.display(),
            m.kver,
            m.agent_version
        ),
    )
    .detail(format!(
        "kernel package: {} {}",
        m.kernel_package, m.kernel_package_version
    ))
    .detail(format!(
        "initrd: {} bytes, {} modules",
        m.initrd_size,
        m.modules.len()
    ));
    if m.agent_version != kata_proto::VERSION {
        o.status = Status::Warn;
        o.summary = format!(
            "{}: agent {} differs from kata-ctl {}; rebuild with `kata-ctl image build`",
            dir.display(),
            m.agent_version,
            kata_proto::VERSION
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_layouts() {
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        let v2 = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_layout(v1), CgroupLayout::V1);
        assert_eq!(
            cgroup_layout(&format!("{v1}{v2}")),
            CgroupLayout::Hybrid("/sys/fs/cgroup/unified".into())
        );
        let only = "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup_layout(only),
            CgroupLayout::V2("/sys/fs/cgroup".into())
        );
        assert_eq!(
            cgroup_layout("1 2 0:3 / /proc rw - proc proc rw\n"),
            CgroupLayout::None
        );
    }

    #[test]
    fn kernel_config_values() {
        let k = KernelConfig {
            source: Some("test".into()),
            text: "CONFIG_MACVTAP=y\nCONFIG_NET_CLS_U32=m\n# CONFIG_NET_ACT_MIRRED is not set\n"
                .into(),
        };
        assert_eq!(k.value("CONFIG_MACVTAP").as_deref(), Some("y"));
        assert_eq!(k.value("CONFIG_NET_CLS_U32").as_deref(), Some("m"));
        assert_eq!(k.value("CONFIG_NET_ACT_MIRRED"), None);
        assert_eq!(k.value("CONFIG_MACVTA"), None);
        let o = check_kernel_features("tc", &k, &[("CONFIG_NET_ACT_MIRRED", "act_mirred")]);
        assert_eq!(o.status, Status::Warn);
    }

    #[test]
    fn rendering() {
        let o = Outcome::new(Status::Ok, "qemu", "/usr/bin/qemu").detail("more");
        assert_eq!(o.render(false), "ok    qemu: /usr/bin/qemu\n");
        assert_eq!(o.render(true), "ok    qemu: /usr/bin/qemu\n        more\n");
        assert!(Outcome::new(Status::Fail, "x", "y")
            .render(false)
            .starts_with("FAIL  x: y"));
    }

    #[test]
    fn missing_guest_image_fails() {
        let o = check_guest_image(
            Path::new("/nonexistent/vmlinuz"),
            Path::new("/nonexistent/i"),
        );
        assert_eq!(o.status, Status::Fail);
        assert!(o.summary.contains("kata-ctl image build"), "{}", o.summary);
    }
}
