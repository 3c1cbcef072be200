//! The kata-rs configuration file: Kata's TOML layout and key names
//! (`[hypervisor.qemu]`, `[agent.kata]`, `[runtime]`), plus kata-rs's own keys
//! (`accelerator`). Unknown keys are errors that name the file and the key, so a
//! typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is looked for, in order, when no path is given.
pub const SEARCH_PATHS: &[&str] = &[
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
];

/// Default location of the guest image built by `kata-ctl image build`.
pub const DEFAULT_GUEST_DIR: &str = "/usr/share/kata-rs/guest";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[hypervisor.*]`
    pub hypervisor: Hypervisors,
    /// `[agent.*]`
    pub agent: Agents,
    /// `[runtime]`
    pub runtime: Runtime,
}

/// `[hypervisor.*]`: only QEMU for now.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hypervisors {
    /// `[hypervisor.qemu]`
    pub qemu: Qemu,
}

/// `[hypervisor.qemu]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Qemu {
    /// The QEMU binary.
    pub path: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (the agent is its /init).
    pub initrd: PathBuf,
    /// `q35`, `pc` or `microvm`.
    pub machine_type: String,
    /// Extra kernel command line.
    pub kernel_params: String,
    /// vCPUs of a pod before the containers' quotas are added.
    pub default_vcpus: u32,
    /// Upper bound of vCPUs.
    pub default_maxvcpus: u32,
    /// MiB of a pod before the containers' limits are added.
    pub default_memory: u64,
    /// kata-rs: `kvm`, `tcg` or `auto` (KVM if it can really boot a guest).
    pub accelerator: String,
    /// Log the guest console at debug level.
    pub enable_debug: bool,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinuz"),
            initrd: Path::new(DEFAULT_GUEST_DIR).join("initrd.img"),
            machine_type: "q35".into(),
            kernel_params: String::new(),
            default_vcpus: 1,
            default_maxvcpus: 0,
            default_memory: 512,
            accelerator: "auto".into(),
            enable_debug: false,
        }
    }
}

/// `[agent.*]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agents {
    /// `[agent.kata]`
    pub kata: Agent,
}

/// `[agent.kata]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    /// Seconds to wait for the agent to answer after boot.
    pub dial_timeout: u64,
    /// Agent debug logs.
    pub enable_debug: bool,
    /// Start the debug console (vsock port 1026).
    pub debug_console_enabled: bool,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            dial_timeout: 45,
            enable_debug: false,
            debug_console_enabled: false,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Debug logs of the host programs.
    pub enable_debug: bool,
    /// Put the whole pod (not only the containers) in the pod's cgroup.
    pub sandbox_cgroup_only: bool,
    /// Ignore the containers' seccomp profiles inside the guest (sent to the
    /// agent in CreateSandbox). Kata defaults to true; kata-rs to false: the
    /// profile is applied, as runc would.
    pub disable_guest_seccomp: bool,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("configuration {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid (syntax, unknown key, wrong type).
    #[error("configuration {path}: {message}")]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// What is wrong, with the key and line.
        message: String,
    },
}

impl Config {
    /// Parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })
    }

    /// Parses configuration text; the error names the key and the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `explicit`, else `$KATA_CONF_FILE`, else the first of [`SEARCH_PATHS`]
    /// that exists, else the built-in defaults.
    pub fn discover(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(p) = explicit {
            return Self::load(p);
        }
        if let Some(p) = std::env::var_os("KATA_CONF_FILE") {
            return Self::load(Path::new(&p));
        }
        for p in SEARCH_PATHS {
            if Path::new(p).exists() {
                return Self::load(Path::new(p));
            }
        }
        Ok(Config::default())
    }

    fn validate(&self) -> Result<(), String> {
        let q = &self.hypervisor.qemu;
        if !matches!(q.accelerator.as_str(), "kvm" | "tcg" | "auto") {
            return Err(format!(
                "hypervisor.qemu.accelerator = {:?}: must be \"kvm\", \"tcg\" or \"auto\"",
                q.accelerator
            ));
        }
        if !matches!(q.machine_type.as_str(), "q35" | "pc" | "microvm") {
            return Err(format!(
                "hypervisor.qemu.machine_type = {:?}: must be \"q35\", \"pc\" or \"microvm\"",
                q.machine_type
            ));
        }
        if q.default_vcpus == 0 {
            return Err("hypervisor.qemu.default_vcpus = 0: a VM needs at least one vCPU".into());
        }
        if q.default_memory < 64 {
            return Err(format!(
                "hypervisor.qemu.default_memory = {}: the guest needs at least 64 MiB",
                q.default_memory
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_keys() {
        let c = Config::parse(
            "[hypervisor.qemu]\npath = \"/q\"\ndefault_memory = 256\naccelerator = \"tcg\"\n[agent.kata]\ndial_timeout = 5\n",
        )
        .unwrap();
        assert_eq!(c.hypervisor.qemu.path, PathBuf::from("/q"));
        assert_eq!(c.hypervisor.qemu.default_memory, 256);
        assert_eq!(c.hypervisor.qemu.default_vcpus, 1);
        assert_eq!(c.agent.kata.dial_timeout, 5);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[hypervisor.qemu]\ndefault_memroy = 256\n").unwrap_err();
        assert!(e.contains("default_memroy"), "{e}");
        let e = Config::parse("[hypervisor.qemu]\ndefault_memory = \"big\"\n").unwrap_err();
        assert!(e.contains("default_memory"), "{e}");
        let e = Config::parse("[hypervisor.qemu]\naccelerator = \"hvf\"\n").unwrap_err();
        assert!(e.contains("accelerator"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let e = Config::load(Path::new("/nonexistent/kata.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kata.toml"), "{e}");
    }
}
