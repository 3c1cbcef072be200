//! The kata-rs configuration file: Kata's TOML layout and key names
//! (`[hypervisor.qemu]`, `[agent.kata]`, `[runtime]`), plus a few keys of
//! kata-rs's own (`accelerator`, `launcher`). `docs/configuration.md` describes
//! every key; `config/configuration.toml` is the packaged default file.
//!
//! * where the file is found: [`Config::discover_with_source`] (explicit path,
//!   `$KATA_CONF_FILE`, then [`SEARCH_PATHS`], else built-in defaults);
//! * what is checked when it is read: syntax, unknown keys, types and ranges
//!   ([`Config::validate`]); every error names the file, the key and the
//!   problem, so a typo never silently falls back to a default;
//! * what is checked only when a pod is created: that the files it names exist
//!   ([`Config::check_files`]), so tools can read a configuration written for
//!   another machine;
//! * per-pod changes: [`Config::apply_annotations`] (Kata's
//!   `io.katacontainers.config.*` annotations, restricted by
//!   `enable_annotations` and the `valid_*_paths` globs);
//! * the size of a pod's VM: [`Config::vm_size`] and [`Workload`].

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

mod annotations;
mod diagnose;
mod error;
pub mod reference;
mod sizing;

pub use annotations::{
    AGENT_ANNOTATION_PREFIX, ANNOTATION_PREFIX, HYPERVISOR_ANNOTATION_PREFIX,
    RUNTIME_ANNOTATION_PREFIX,
};
pub use error::ConfigError;
pub use sizing::{
    VmSize, Workload, SANDBOX_CPU_PERIOD_ANNOTATION, SANDBOX_CPU_QUOTA_ANNOTATION,
    SANDBOX_MEMORY_ANNOTATION,
};

/// Where the configuration is looked for, in order, when neither an explicit
/// path nor `$KATA_CONF_FILE` is given.
pub const SEARCH_PATHS: &[&str] = &[
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
];

/// The environment variable naming the configuration file (Kata's).
pub const CONF_FILE_ENV: &str = "KATA_CONF_FILE";

/// Default location of the guest image built by `kata-ctl image build`.
pub const DEFAULT_GUEST_DIR: &str = "/usr/share/kata-rs/guest";

/// qboot, the minimal firmware Debian's QEMU ships: the default `firmware`
/// (it hands over to the kernel sooner than SeaBIOS: docs/benchmarks.md).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// File name of the VMM launcher, looked for when `launcher` is empty.
pub const LAUNCHER_NAME: &str = "kata-vmm-launcher";
/// The file name of kata-trace-forwarder.
pub const TRACE_FORWARDER_NAME: &str = "kata-trace-forwarder";

/// File name of the virtio-fs daemon, looked for when `virtio_fs_daemon` is empty.
pub const VIRTIOFSD_NAME: &str = "kata-virtiofsd";
/// The network monitor's program name.
pub const NETMON_NAME: &str = "kata-netmon";

/// The kata-netmon to run: [`NETMON_NAME`] next to the running program (the
/// shim), else the first in `$PATH`.
pub fn netmon_path() -> Result<PathBuf, ConfigError> {
    resolve_helper("netmon", Path::new(""), NETMON_NAME)
}

/// Most vCPUs a q35 QEMU guest is given (Kata's limit on x86_64).
pub const MAX_VCPUS: u32 = 240;

/// Least memory (MiB) the guest boots with.
pub const MIN_MEMORY_MIB: u64 = 64;

/// Experimental features kata-rs knows (none yet); `[runtime] experimental`
/// may only name these.
pub const EXPERIMENTAL_FEATURES: &[&str] = &[];

/// kata-virtiofsd options the shim sets itself; `virtio_fs_extra_args` may not
/// repeat them.
pub const VIRTIOFSD_RESERVED_ARGS: &[&str] = &[
    "--socket-path",
    "--shared-dir",
    "--fuse-mount",
    "--control-socket",
    "--sandbox-id",
    "--cache",
];

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[hypervisor.*]`
    pub hypervisor: Hypervisors,
    /// `[agent.*]`
    pub agent: Agents,
    /// `[runtime]`
    pub runtime: Runtime,
    /// The file this was read from; `None`: built-in defaults or text.
    #[serde(skip)]
    source: Option<PathBuf>,
}

/// `[hypervisor.*]`: only QEMU.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hypervisors {
    /// `[hypervisor.qemu]`
    pub qemu: Qemu,
}

/// `[hypervisor.qemu]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Qemu {
    /// The QEMU binary (under `/usr`: the launcher's jail exposes `/usr` only).
    pub path: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (the agent is its /init).
    pub initrd: PathBuf,
    /// `q35`, `pc` or `microvm`.
    pub machine_type: String,
    /// The firmware QEMU runs before the kernel (`-bios`), under `/usr`;
    /// empty: QEMU's own for the machine (SeaBIOS on q35 and pc).
    pub firmware: PathBuf,
    /// Extra guest kernel command line.
    pub kernel_params: String,
    /// vCPUs of a VM before the workload's CPU limits are added. A fraction
    /// (Kata's float form) is rounded up.
    #[serde(deserialize_with = "de_vcpus")]
    pub default_vcpus: u32,
    /// Most vCPUs of a VM; 0: the host CPUs the shim may run on.
    pub default_maxvcpus: u32,
    /// MiB of a VM before the workload's memory limits are added.
    pub default_memory: u64,
    /// Most MiB a VM may grow to by memory hot-plug; 0: the host's memory.
    pub default_maxmemory: u64,
    /// Memory hot-plug slots: each resize that adds memory takes one DIMM
    /// slot; 0: no memory hot-plug.
    pub memory_slots: u32,
    /// PCIe root ports kept free for NICs hot-plugged while the pod runs
    /// (an interface added to the pod's netns after the VM started, as
    /// `ctr run --cni` does); used for pods with a network on `q35`, at
    /// most 16. Each costs a little guest boot time (docs/benchmarks.md).
    pub pcie_root_port: u32,
    /// How container filesystems reach the guest.
    pub shared_fs: SharedFs,
    /// kata-virtiofsd; empty: next to the running program, else `$PATH`.
    pub virtio_fs_daemon: PathBuf,
    /// Guest caching of the shared filesystem.
    pub virtio_fs_cache: VirtioFsCache,
    /// Extra kata-virtiofsd options.
    pub virtio_fs_extra_args: Vec<String>,
    /// DAX window (MiB); only 0 (no DAX) is supported.
    pub virtio_fs_cache_size: u32,
    /// Log the guest console at debug level.
    pub enable_debug: bool,
    /// Regular expressions; a hypervisor annotation is honoured only if its
    /// key (after `io.katacontainers.config.hypervisor.`) fully matches one.
    pub enable_annotations: Vec<String>,
    /// Globs an annotation-chosen `path` must match; empty: none may be chosen.
    pub valid_hypervisor_paths: Vec<String>,
    /// Globs an annotation-chosen `virtio_fs_daemon` must match; empty: none may be chosen.
    pub valid_virtio_fs_daemon_paths: Vec<String>,
    /// kata-rs: `kvm`, `tcg` or `auto` (KVM if it can really boot a guest).
    pub accelerator: String,
    /// kata-rs: kata-vmm-launcher; empty: next to the running program, else `$PATH`.
    pub launcher: PathBuf,
    /// kata-rs: how many guests of the node boot at once (the rest wait
    /// their turn, [`crate::boot_slots`]); 0: no limit; -1: the host's CPUs
    /// under TCG, no limit with KVM.
    pub max_concurrent_boots: i32,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinuz"),
            initrd: Path::new(DEFAULT_GUEST_DIR).join("initrd.img"),
            machine_type: "q35".into(),
            firmware: PathBuf::from(QBOOT),
            kernel_params: String::new(),
            default_vcpus: 1,
            default_maxvcpus: 0,
            default_memory: 512,
            default_maxmemory: 0,
            memory_slots: 10,
            pcie_root_port: 2,
            shared_fs: SharedFs::VirtioFs,
            virtio_fs_daemon: PathBuf::new(),
            virtio_fs_cache: VirtioFsCache::Auto,
            virtio_fs_extra_args: Vec::new(),
            virtio_fs_cache_size: 0,
            enable_debug: false,
            enable_annotations: Vec::new(),
            valid_hypervisor_paths: Vec::new(),
            valid_virtio_fs_daemon_paths: Vec::new(),
            accelerator: "auto".into(),
            launcher: PathBuf::new(),
            max_concurrent_boots: -1,
        }
    }
}

/// `shared_fs`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFs {
    /// virtio-fs served by kata-virtiofsd (`"virtio-fs"`).
    #[default]
    VirtioFs,
    /// No shared filesystem (`"none"`).
    None,
}

impl SharedFs {
    /// The configuration name (`"virtio-fs"` or `"none"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SharedFs::VirtioFs => "virtio-fs",
            SharedFs::None => "none",
        }
    }
}

/// `virtio_fs_cache`, with Kata's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtioFsCache {
    /// Metadata and data cached for a short while, close-to-open consistency.
    #[default]
    Auto,
    /// Everything cached: the guest is the only writer.
    Always,
    /// Nothing cached (`"never"`; Kata's older name `"none"` is accepted).
    #[serde(alias = "none")]
    Never,
}

impl VirtioFsCache {
    /// Kata's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            VirtioFsCache::Auto => "auto",
            VirtioFsCache::Always => "always",
            VirtioFsCache::Never => "never",
        }
    }

    /// The value of kata-virtiofsd's `--cache` (`never` is called `none` there).
    pub fn virtiofsd_arg(self) -> &'static str {
        match self {
            VirtioFsCache::Auto => "auto",
            VirtioFsCache::Always => "always",
            VirtioFsCache::Never => "none",
        }
    }
}

/// `[agent.*]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agents {
    /// `[agent.kata]`
    pub kata: Agent,
}

/// `[agent.kata]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    /// Seconds to wait for the agent to answer after boot.
    pub dial_timeout: u64,
    /// Milliseconds the shim waits for the agent to answer one request
    /// (Kata runtime-rs's key); the event waits (WaitProcess, GetOOMEvent)
    /// have no deadline.
    pub request_timeout_ms: u64,
    /// Agent debug logs.
    pub enable_debug: bool,
    /// Start the debug console (vsock port 1026).
    pub debug_console_enabled: bool,
    /// Guest kernel modules to load at sandbox creation: each entry is a
    /// module name followed by its parameters, e.g. `"e1000e EEE=1"`.
    pub kernel_modules: Vec<String>,
    /// The agent traces its requests: its spans go over vsock port 10240
    /// to a kata-trace-forwarder the shim starts, which sends them to
    /// `[runtime] jaeger_endpoint`.
    pub enable_tracing: bool,
    /// The kata-trace-forwarder to run (default: next to the shim, else in
    /// `$PATH`).
    pub trace_forwarder: PathBuf,
    /// The agent policy (Rego text) the shim gives the agent with SetPolicy
    /// before any container is created: only from the pod's annotation
    /// `io.katacontainers.config.agent.policy` (base64), never a TOML key.
    #[serde(skip)]
    pub policy: Option<String>,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            dial_timeout: 45,
            request_timeout_ms: 60_000,
            enable_debug: false,
            debug_console_enabled: false,
            kernel_modules: Vec::new(),
            enable_tracing: false,
            trace_forwarder: PathBuf::new(),
            policy: None,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Debug logs of the host programs.
    pub enable_debug: bool,
    /// How the VM is connected to the pod's network interfaces.
    pub internetworking_model: InterworkingModel,
    /// Put every host process of the pod (QEMU and the helpers) in the pod's
    /// cgroup; false: only QEMU.
    pub sandbox_cgroup_only: bool,
    /// Ignore the containers' seccomp profiles inside the guest (sent to the
    /// agent in CreateSandbox). Kata defaults to true; kata-rs to false: the
    /// profile is applied, as runc would.
    pub disable_guest_seccomp: bool,
    /// Do not create a network namespace for the VM (only with
    /// `internetworking_model = "none"`).
    pub disable_new_netns: bool,
    /// Accepted for Kata compatibility (Go's pprof); no effect.
    pub enable_pprof: bool,
    /// The shim, the launcher and kata-virtiofsd trace: one trace per
    /// container, exported to `jaeger_endpoint`.
    pub enable_tracing: bool,
    /// The OTLP/gRPC collector of the traces (Kata's key; Jaeger >= 1.35
    /// takes OTLP on port 4317); empty: `http://localhost:4317`.
    pub jaeger_endpoint: String,
    /// Basic authentication user for the collector (Kata's key).
    pub jaeger_user: String,
    /// Basic authentication password for the collector (Kata's key).
    pub jaeger_password: String,
    /// Size the VM once, at boot, for the whole pod, and never resize it;
    /// false: vCPUs and memory are hot-plugged as containers come, go and
    /// are updated.
    pub static_sandbox_resource_mgmt: bool,
    /// kata-rs: MiB the pod's host cgroup may use beyond the VM's memory
    /// (QEMU and, with `sandbox_cgroup_only`, the helpers), when its
    /// containers have memory limits.
    pub sandbox_cgroup_overhead_mib: u64,
    /// kata-rs: thousandths of a CPU the pod's host cgroup may use beyond
    /// its containers' CPU limits, when they have some.
    pub sandbox_cgroup_overhead_millicpus: u64,
    /// Experimental features to enable (see [`EXPERIMENTAL_FEATURES`]).
    pub experimental: Vec<String>,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            enable_debug: false,
            internetworking_model: InterworkingModel::TcFilter,
            sandbox_cgroup_only: false,
            disable_guest_seccomp: false,
            disable_new_netns: false,
            enable_pprof: false,
            enable_tracing: false,
            jaeger_endpoint: String::new(),
            jaeger_user: String::new(),
            jaeger_password: String::new(),
            static_sandbox_resource_mgmt: false,
            sandbox_cgroup_overhead_mib: 256,
            sandbox_cgroup_overhead_millicpus: 250,
            experimental: Vec::new(),
        }
    }
}

/// `internetworking_model`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InterworkingModel {
    /// A tap per interface, traffic mirrored with tc ingress filters.
    #[default]
    TcFilter,
    /// A macvtap per interface.
    Macvtap,
    /// No network plumbing.
    None,
}

impl Config {
    /// Parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| e.in_file(path))?;
        cfg.source = Some(path.into());
        Ok(cfg)
    }

    /// Parses configuration text; the error starts with the key, e.g.
    /// `hypervisor.qemu.default_memory: invalid type: string "big", expected u64`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg = diagnose::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `explicit`, else `$KATA_CONF_FILE`, else the first of [`SEARCH_PATHS`]
    /// that exists, else the built-in defaults.
    pub fn discover(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        Self::discover_with_source(explicit).map(|(cfg, _)| cfg)
    }

    /// As [`Config::discover`], also returning the file used (`None`: the
    /// built-in defaults), for error messages and `kata-ctl env`.
    pub fn discover_with_source(
        explicit: Option<&Path>,
    ) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let search: Vec<&Path> = SEARCH_PATHS.iter().map(Path::new).collect();
        Self::discover_in(explicit, std::env::var_os(CONF_FILE_ENV), &search)
    }

    /// The lookup of [`Config::discover_with_source`] with the environment
    /// variable's value and the search list given.
    fn discover_in(
        explicit: Option<&Path>,
        env: Option<OsString>,
        search: &[&Path],
    ) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let chosen = match (explicit, env) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(p)) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => search.iter().find(|p| p.exists()).map(|p| p.to_path_buf()),
        };
        match chosen {
            Some(p) => Ok((Self::load(&p)?, Some(p))),
            None => Ok((Config::default(), None)),
        }
    }

    /// The file this configuration was read from (`None`: built-in defaults,
    /// or parsed from text).
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The file this configuration was read from, for messages.
    pub(crate) fn source_display(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => format!(
                "{} (none was found: the built-in defaults are in use)",
                SEARCH_PATHS[0]
            ),
        }
    }

    /// Checks values that need no file system: ranges, names, absolute paths,
    /// regular expressions. [`Config::parse`] and [`Config::apply_annotations`]
    /// call it; the error starts with the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use ConfigError as E;
        let q = &self.hypervisor.qemu;
        if !matches!(q.accelerator.as_str(), "kvm" | "tcg" | "auto") {
            return Err(E::bad(
                "hypervisor.qemu.accelerator",
                &q.accelerator,
                "must be \"kvm\", \"tcg\" or \"auto\"",
            ));
        }
        if q.max_concurrent_boots < -1 {
            return Err(E::bad(
                "hypervisor.qemu.max_concurrent_boots",
                q.max_concurrent_boots,
                "-1 (the host's CPUs under TCG), 0 (no limit) or a count",
            ));
        }
        if q.pcie_root_port > 16 {
            return Err(E::bad(
                "hypervisor.qemu.pcie_root_port",
                q.pcie_root_port,
                "at most 16",
            ));
        }
        if !matches!(q.machine_type.as_str(), "q35" | "pc" | "microvm") {
            return Err(E::bad(
                "hypervisor.qemu.machine_type",
                &q.machine_type,
                "must be \"q35\", \"pc\" or \"microvm\"",
            ));
        }
        under_usr("hypervisor.qemu.path", &q.path, false, "")?;
        under_usr(
            "hypervisor.qemu.firmware",
            &q.firmware,
            true,
            ", e.g. /usr/share/qemu/qboot.rom; empty: QEMU's default",
        )?;
        absolute("hypervisor.qemu.kernel", &q.kernel, false)?;
        absolute("hypervisor.qemu.initrd", &q.initrd, false)?;
        absolute(
            "hypervisor.qemu.virtio_fs_daemon",
            &q.virtio_fs_daemon,
            true,
        )?;
        absolute("hypervisor.qemu.launcher", &q.launcher, true)?;
        absolute(
            "agent.kata.trace_forwarder",
            &self.agent.kata.trace_forwarder,
            true,
        )?;
        let ep = &self.runtime.jaeger_endpoint;
        if !ep.is_empty() {
            let rest = ep
                .strip_prefix("http://")
                .or_else(|| ep.strip_prefix("https://"))
                .unwrap_or("");
            if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
                return Err(E::bad(
                    "runtime.jaeger_endpoint",
                    ep,
                    "must be an OTLP/gRPC URL such as http://localhost:4317",
                ));
            }
        }
        if q.default_vcpus == 0 {
            return Err(E::bad(
                "hypervisor.qemu.default_vcpus",
                0,
                "a VM needs at least one vCPU",
            ));
        }
        if q.default_maxvcpus > MAX_VCPUS {
            return Err(E::bad(
                "hypervisor.qemu.default_maxvcpus",
                q.default_maxvcpus,
                format!("QEMU takes at most {MAX_VCPUS}"),
            ));
        }
        if q.default_vcpus > MAX_VCPUS {
            return Err(E::bad(
                "hypervisor.qemu.default_vcpus",
                q.default_vcpus,
                format!("QEMU takes at most {MAX_VCPUS}"),
            ));
        }
        if q.default_maxvcpus > 0 && q.default_vcpus > q.default_maxvcpus {
            return Err(E::bad(
                "hypervisor.qemu.default_vcpus",
                q.default_vcpus,
                format!("more than default_maxvcpus = {}", q.default_maxvcpus),
            ));
        }
        if q.default_memory < MIN_MEMORY_MIB {
            return Err(E::bad(
                "hypervisor.qemu.default_memory",
                q.default_memory,
                format!("the guest needs at least {MIN_MEMORY_MIB} MiB"),
            ));
        }
        if q.default_maxmemory > 0 && q.default_maxmemory < q.default_memory {
            return Err(E::bad(
                "hypervisor.qemu.default_maxmemory",
                q.default_maxmemory,
                format!("less than default_memory = {}", q.default_memory),
            ));
        }
        if q.virtio_fs_cache_size != 0 {
            return Err(E::bad(
                "hypervisor.qemu.virtio_fs_cache_size",
                q.virtio_fs_cache_size,
                "DAX is not supported by kata-rs, use 0",
            ));
        }
        for (i, arg) in q.virtio_fs_extra_args.iter().enumerate() {
            if let Some(r) = VIRTIOFSD_RESERVED_ARGS
                .iter()
                .find(|r| arg == *r || arg.strip_prefix(*r).is_some_and(|s| s.starts_with('=')))
            {
                return Err(E::bad(
                    format!("hypervisor.qemu.virtio_fs_extra_args[{i}]"),
                    arg,
                    format!("{r} is set by kata-rs itself"),
                ));
            }
        }
        for (i, re) in q.enable_annotations.iter().enumerate() {
            if let Err(e) = regex_lite::Regex::new(re) {
                return Err(E::bad(
                    format!("hypervisor.qemu.enable_annotations[{i}]"),
                    re,
                    format!("not a regular expression: {e}"),
                ));
            }
        }
        for (key, globs) in [
            ("valid_hypervisor_paths", &q.valid_hypervisor_paths),
            (
                "valid_virtio_fs_daemon_paths",
                &q.valid_virtio_fs_daemon_paths,
            ),
        ] {
            for (i, g) in globs.iter().enumerate() {
                if !g.starts_with('/') {
                    return Err(E::bad(
                        format!("hypervisor.qemu.{key}[{i}]"),
                        g,
                        "must be an absolute path pattern",
                    ));
                }
            }
        }
        let a = &self.agent.kata;
        if a.dial_timeout == 0 {
            return Err(E::bad(
                "agent.kata.dial_timeout",
                0,
                "must be at least 1 second",
            ));
        }
        if a.request_timeout_ms < 100 {
            return Err(E::bad(
                "agent.kata.request_timeout_ms",
                a.request_timeout_ms,
                "must be at least 100",
            ));
        }
        for (i, m) in a.kernel_modules.iter().enumerate() {
            check_kernel_module(m)
                .map_err(|why| E::bad(format!("agent.kata.kernel_modules[{i}]"), m, why))?;
        }
        let r = &self.runtime;
        for (i, f) in r.experimental.iter().enumerate() {
            if !EXPERIMENTAL_FEATURES.contains(&f.as_str()) {
                return Err(E::bad(
                    format!("runtime.experimental[{i}]"),
                    f,
                    format!(
                        "unknown feature (kata-rs has {})",
                        if EXPERIMENTAL_FEATURES.is_empty() {
                            "no experimental features".to_string()
                        } else {
                            EXPERIMENTAL_FEATURES.join(", ")
                        }
                    ),
                ));
            }
        }
        if r.disable_new_netns && r.internetworking_model != InterworkingModel::None {
            return Err(E::bad(
                "runtime.disable_new_netns",
                true,
                format!(
                    "needs internetworking_model = \"none\" (it is {:?})",
                    r.internetworking_model.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Checks that the files the configuration names exist and have the right
    /// kind: `path`, `kernel`, `initrd`, the launcher and, with
    /// `shared_fs = "virtio-fs"`, the virtio-fs daemon. Not part of loading
    /// (tools read configurations written for other machines); the shim calls
    /// it when it creates a pod. Every problem is reported, `; `-separated,
    /// each starting with the key.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let q = &self.hypervisor.qemu;
        let check = |key: &str, shown: &Path, path: &Path, executable: bool| {
            check_file(path, executable).map_err(|problem| ConfigError::MissingFile {
                key: format!("hypervisor.qemu.{key}"),
                path: shown.to_path_buf(),
                problem,
            })
        };
        let launcher = q
            .launcher_path()
            .and_then(|p| check("launcher", &q.launcher, &p, true));
        let mut results = vec![
            check("path", &q.path, &q.path, true),
            check("kernel", &q.kernel, &q.kernel, false),
            check("initrd", &q.initrd, &q.initrd, false),
            launcher,
        ];
        if !q.firmware.as_os_str().is_empty() {
            results.push(check("firmware", &q.firmware, &q.firmware, false));
        }
        if q.shared_fs == SharedFs::VirtioFs {
            results.push(
                q.virtio_fs_daemon_path()
                    .and_then(|p| check("virtio_fs_daemon", &q.virtio_fs_daemon, &p, true)),
            );
        }
        let mut problems: Vec<ConfigError> = results.into_iter().filter_map(Result::err).collect();
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

impl Qemu {
    /// kata-virtiofsd's `--cache` value for `virtio_fs_cache` (Kata's
    /// `"never"` is kata-virtiofsd's `"none"`).
    pub fn virtiofsd_cache_mode(&self) -> &'static str {
        self.virtio_fs_cache.virtiofsd_arg()
    }

    /// The kata-vmm-launcher to run: `launcher`, else [`LAUNCHER_NAME`] next
    /// to the running program (the shim), else the first in `$PATH`.
    pub fn launcher_path(&self) -> Result<PathBuf, ConfigError> {
        resolve_helper("hypervisor.qemu.launcher", &self.launcher, LAUNCHER_NAME)
    }

    /// The kata-virtiofsd to run: `virtio_fs_daemon`, else [`VIRTIOFSD_NAME`]
    /// next to the running program, else the first in `$PATH`.
    pub fn virtio_fs_daemon_path(&self) -> Result<PathBuf, ConfigError> {
        resolve_helper(
            "hypervisor.qemu.virtio_fs_daemon",
            &self.virtio_fs_daemon,
            VIRTIOFSD_NAME,
        )
    }
}

impl Agent {
    /// The kata-trace-forwarder to run: `trace_forwarder`, else
    /// [`TRACE_FORWARDER_NAME`] next to the running program, else in `$PATH`.
    pub fn trace_forwarder_path(&self) -> Result<PathBuf, ConfigError> {
        resolve_helper(
            "agent.kata.trace_forwarder",
            &self.trace_forwarder,
            TRACE_FORWARDER_NAME,
        )
    }
}

impl Runtime {
    /// The collector traces go to: `jaeger_endpoint`, else the local one.
    pub fn tracing_endpoint(&self) -> &str {
        if self.jaeger_endpoint.is_empty() {
            crate::trace::otlp::DEFAULT_ENDPOINT
        } else {
            &self.jaeger_endpoint
        }
    }

    /// The collector's basic authentication, if a user is configured.
    pub fn tracing_auth(&self) -> Option<(&str, &str)> {
        (!self.jaeger_user.is_empty()).then_some((&self.jaeger_user, &self.jaeger_password))
    }
}

impl InterworkingModel {
    /// The configuration name (`"tcfilter"`, `"macvtap"` or `"none"`).
    pub fn as_str(self) -> &'static str {
        match self {
            InterworkingModel::TcFilter => "tcfilter",
            InterworkingModel::Macvtap => "macvtap",
            InterworkingModel::None => "none",
        }
    }
}

/// Comparison with the configuration names, e.g. `q.shared_fs == "none"`.
macro_rules! eq_name {
    ($($t:ty),*) => {$(
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
eq_name!(SharedFs, VirtioFsCache, InterworkingModel);

/// `configured` if set, else `name` next to the running program, else in `$PATH`.
fn resolve_helper(key: &str, configured: &Path, name: &str) -> Result<PathBuf, ConfigError> {
    if !configured.as_os_str().is_empty() {
        return Ok(configured.to_path_buf());
    }
    let exe = std::env::current_exe().ok();
    let beside = exe.as_ref().map(|e| e.with_file_name(name));
    if let Some(b) = beside.as_ref().filter(|b| b.is_file()) {
        return Ok(b.clone());
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_absolute() && p.is_file())
    }) {
        return Ok(found);
    }
    Err(ConfigError::HelperNotFound {
        key: key.into(),
        name: name.into(),
        beside: exe
            .map(|e| e.display().to_string())
            .unwrap_or_else(|| "the running program".into()),
    })
}

/// An absolute path with no `.` or `..` component (`optional`: or empty).
fn absolute(key: &str, p: &Path, optional: bool) -> Result<(), ConfigError> {
    if optional && p.as_os_str().is_empty() {
        return Ok(());
    }
    if !is_clean_absolute(p) {
        return Err(ConfigError::bad(
            key,
            p,
            "must be an absolute path without . or .. components",
        ));
    }
    Ok(())
}

/// `key` names a file the launcher's jail must reach: a clean absolute
/// path under `/usr` (the one host directory the jail exposes); `hint` is
/// added to the error.
fn under_usr(key: &str, p: &Path, optional: bool, hint: &str) -> Result<(), ConfigError> {
    absolute(key, p, optional)?;
    if (optional && p.as_os_str().is_empty()) || is_under_usr(p) {
        return Ok(());
    }
    Err(ConfigError::bad(
        key,
        p,
        format!("must be under /usr (the launcher's jail exposes /usr only){hint}"),
    ))
}

/// A clean absolute path below `/usr` (so it stays there): what the
/// launcher's jail can reach of the host.
pub fn is_under_usr(p: &Path) -> bool {
    is_clean_absolute(p) && p.starts_with("/usr") && p != Path::new("/usr")
}

/// Absolute, and made only of normal components.
pub(crate) fn is_clean_absolute(p: &Path) -> bool {
    use std::path::Component;
    let s = p.as_os_str().as_encoded_bytes();
    let mut comps = p.components();
    comps.next() == Some(Component::RootDir)
        && comps.all(|c| matches!(c, Component::Normal(_)))
        && !s.windows(2).any(|w| w == b"//")
        && !s.split(|b| *b == b'/').any(|c| c == b"." || c == b"..")
}

/// A regular file, executable if asked.
fn check_file(p: &Path, executable: bool) -> Result<(), String> {
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("the file does not exist".into())
        }
        Err(e) => return Err(format!("cannot be read: {e}")),
    };
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if executable && meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

/// `name [param=value ...]`, the name made of letters, digits, `_` and `-`.
pub(crate) fn check_kernel_module(entry: &str) -> Result<(), String> {
    let mut words = entry.split_whitespace();
    let Some(name) = words.next() else {
        return Err("empty: a module name is required".into());
    };
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!("{name:?} is not a module name"));
    }
    if entry.chars().any(char::is_control) {
        return Err("control characters are not allowed".into());
    }
    Ok(())
}

/// `default_vcpus`: an integer, or Kata's float form rounded up.
fn de_vcpus<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Vcpus;
    impl serde::de::Visitor<'_> for Vcpus {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number of vCPUs (a fraction is rounded up)")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u32, E> {
            vcpus_from_f64(v)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Float(v), &self))
        }
    }
    d.deserialize_any(Vcpus)
}

/// A non-negative finite number of vCPUs, rounded up.
pub(crate) fn vcpus_from_f64(v: f64) -> Option<u32> {
    if v.is_finite() && v >= 0.0 && v <= f64::from(u32::MAX) {
        // In range and finite: the cast is exact after ceil.
        Some(v.ceil() as u32)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
