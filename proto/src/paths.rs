//! Well-known paths and vsock ports. One place, so the shim, the launcher, the
//! tools and the tests agree on where a sandbox's sockets live.

use std::path::{Path, PathBuf};

/// Kata's well-known guest vsock ports.
pub mod ports {
    /// The agent's gRPC API.
    pub const AGENT: u32 = 1024;
    /// The agent's log stream (guest to host).
    pub const LOG: u32 = 1025;
    /// The debug console.
    pub const DEBUG_CONSOLE: u32 = 1026;
    /// Process stdio streams (Kata's passfd I/O port): one connection per
    /// stdin/stdout/stderr, raw bytes after a header line (see agent.proto).
    pub const STDIO: u32 = 1027;
    /// kata-rs: the agent dials this host port once it listens, so the host
    /// knows the guest is ready without polling `CONNECT` during boot.
    pub const READY: u32 = 1028;
    /// Trace spans (guest to host).
    pub const TRACING: u32 = 10240;
}

/// The guest CID used with hybrid vsock (the backend has a single guest).
pub const HYBRID_GUEST_CID: u32 = 3;

/// Root of the per-sandbox run directories: `$KATA_RUN_DIR`, else `/run/kata`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("KATA_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kata"))
}

/// The shim's management socket in a pod's directory (Kata runtime-rs's
/// name): HTTP with `/metrics` and `/agent-url`, for kata-monitor and kata-ctl.
pub const SHIM_MONITOR_SOCKET: &str = "shim-monitor.sock";

/// The files of one sandbox directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// `/run/kata/<id>`
    pub dir: PathBuf,
}

impl SandboxPaths {
    /// Paths of the sandbox `id` under [`run_dir`].
    pub fn new(id: &str) -> Self {
        Self {
            dir: run_dir().join(id),
        }
    }

    /// Paths of a sandbox living in `dir`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The launcher's gRPC socket.
    pub fn launcher_socket(&self) -> PathBuf {
        self.dir.join("launcher.sock")
    }

    /// The launcher's state file (pids, resources), read by `cleanup`.
    pub fn launcher_state(&self) -> PathBuf {
        self.dir.join("launcher.json")
    }

    /// Host end of the hybrid vsock: `CONNECT <port>` here reaches the guest;
    /// guest connections to host port P arrive on `<this>_P`.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// Directory mounted into the hypervisor's jail (vhost-user and QMP sockets).
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join("vm")
    }

    /// The jail's root (a mount point inside the hypervisor's mount namespace).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The shim's management socket ([`SHIM_MONITOR_SOCKET`]).
    pub fn shim_monitor_socket(&self) -> PathBuf {
        self.dir.join(SHIM_MONITOR_SOCKET)
    }

    /// Default guest console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// kata-virtiofsd's vhost-user socket (in the hypervisor's `vm/` dir,
    /// where the jailed QEMU can reach it).
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.vm_dir().join("virtiofsd.sock")
    }

    /// The network namespace the shim made for a pod whose spec asked for a
    /// new one (a bind mount of nsfs on this file).
    pub fn pod_netns(&self) -> PathBuf {
        self.dir.join("netns")
    }

    /// kata-netmon's API socket (`netmon.proto`).
    pub fn netmon_socket(&self) -> PathBuf {
        self.dir.join("netmon.sock")
    }

    /// kata-virtiofsd's control socket (gRPC, `virtiofsd.proto`).
    pub fn virtiofsd_control(&self) -> PathBuf {
        self.dir.join("virtiofsd-ctl.sock")
    }

    /// The host-only tree where the shim mounts container rootfs and volumes
    /// (`shared_dir` is its read-only view for the guest).
    pub fn host_mounts_dir(&self) -> PathBuf {
        self.dir.join("mounts")
    }

    /// The directory shared with the guest through virtio-fs: a read-only
    /// slave bind of [`Self::host_mounts_dir`].
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }
}

/// `<uds>_<port>`: where a guest-initiated connection to host port `port` arrives.
pub fn hybrid_listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_path() {
        assert_eq!(
            hybrid_listener_path(Path::new("/run/kata/x/vsock.sock"), 1028),
            PathBuf::from("/run/kata/x/vsock.sock_1028")
        );
    }
}
