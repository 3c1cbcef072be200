//! `kata-ctl env`: what a pod created now would be configured with, as TOML
//! (Kata's `kata-runtime env` / `kata-ctl env`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kata_proto::config::{Config, ConfigError};
use serde::Serialize;

#[derive(Serialize)]
struct Env {
    meta: Meta,
    helpers: Helpers,
    configuration: Config,
}

#[derive(Serialize)]
struct Meta {
    version: &'static str,
    /// The file the configuration came from, or "built-in defaults".
    source: String,
    host_kernel: String,
    run_dir: PathBuf,
}

#[derive(Serialize)]
struct Helpers {
    launcher: String,
    virtio_fs_daemon: String,
}

fn resolved(r: Result<PathBuf, ConfigError>) -> String {
    match r {
        Ok(p) => p.display().to_string(),
        Err(e) => format!("(not found: {e})"),
    }
}

/// Renders the environment as TOML.
pub fn render(config: Option<&Path>) -> Result<String> {
    let (cfg, source) = Config::discover_with_source(config)?;
    let q = &cfg.hypervisor.qemu;
    let env = Env {
        meta: Meta {
            version: kata_proto::VERSION,
            source: source
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "built-in defaults".into()),
            host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            run_dir: kata_proto::paths::run_dir(),
        },
        helpers: Helpers {
            launcher: resolved(q.launcher_path()),
            virtio_fs_daemon: resolved(q.virtio_fs_daemon_path()),
        },
        configuration: cfg,
    };
    toml::to_string(&env).context("rendering the environment as TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_file_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[hypervisor.qemu]\ndefault_memory = 300\n").unwrap();
        let out = render(Some(&p)).unwrap();
        assert!(
            out.contains(&format!("source = \"{}\"", p.display())),
            "{out}"
        );
        assert!(out.contains("default_memory = 300"), "{out}");
        // the keys of VM sizing, hot-plug and host cgroups
        for key in [
            "default_maxvcpus = 0",
            "default_maxmemory = 0",
            "memory_slots = 10",
            "sandbox_cgroup_only = false",
            "static_sandbox_resource_mgmt = false",
            "sandbox_cgroup_overhead_mib = 256",
        ] {
            assert!(out.contains(key), "{key}: {out}");
        }
        let back: toml::Value = toml::from_str(&out).unwrap();
        assert!(back.get("configuration").is_some());
        let e = render(Some(Path::new("/nonexistent.toml"))).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent.toml"));
    }
}
