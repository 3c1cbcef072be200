//! A real systemd for the tests of kata-rs's systemd cgroup driver, on a
//! machine whose PID 1 is not systemd: Debian's systemd runs as PID 1 of a
//! private PID, mount, cgroup and UTS namespace, with Debian's D-Bus system
//! bus, and nothing else of the host's units.
//!
//! * Its cgroup namespace is rooted at a cgroup of its own
//!   (`kata-rs-systemd-<pid>` in every hierarchy), so the slices and scopes
//!   it makes stay below it; its mount namespace has the cgroup hierarchies
//!   mounted again at that root, a private `/run` (its D-Bus socket is
//!   `/run/dbus/system_bus_socket` there) with the host's `/run/kata`, the
//!   private containerds' directory and ctr's FIFO directory bound in (the
//!   shims find what ctr and the tests see).
//! * Its units come from a directory of its own (`SYSTEMD_UNIT_PATH`): a
//!   target wanting Debian's `dbus.socket` and `dbus.service`. Host services
//!   are never started.
//! * A containerd started with [`crate::containerd::Builder::namespaces_of`]
//!   its pid runs its shims inside: they reach this systemd over D-Bus.
//!
//! Dropping it makes systemd exit at once (`systemctl --force exit`: the
//! kernel ends every process of its PID namespace), kills its PID 1 if it
//! did not within 10 s, and removes its cgroups.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UNITS_FROM_DEBIAN: &[&str] = &["dbus.service", "dbus.socket"];

/// A private systemd (see the module documentation).
#[derive(Debug)]
pub struct PrivateSystemd {
    unshare: Child,
    pid: u32,
    cgroup: String,
    _dir: tempfile::TempDir,
}

/// The script that moves itself into the private cgroup, then starts
/// systemd in fresh namespaces.
const LAUNCH: &str = r#"set -e
for h in /sys/fs/cgroup/*/; do
  mkdir -p "$h$CG"
  if [ -f "${h}cpuset.cpus" ]; then
    cat "${h}cpuset.cpus" > "$h$CG/cpuset.cpus"; cat "${h}cpuset.mems" > "$h$CG/cpuset.mems"
  fi
  echo $$ > "$h$CG/cgroup.procs"
done
exec unshare --pid --fork --mount --cgroup --uts --propagation private sh -ec "$INNER"
"#;

/// Inside the namespaces: /proc, /run, the cgroup mounts, then systemd.
const INNER: &str = r#"mount -t proc proc /proc
mkdir -p "$DIR/hostrun"
mount --bind /run "$DIR/hostrun"
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock
for d in $RUN_BINDS; do
  mkdir -p "/run/$d"
  mount --bind "$DIR/hostrun/$d" "/run/$d"
done
umount -l "$DIR/hostrun"
mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup
for opts in $V1; do
  name=${opts#none,name=}
  mkdir "/sys/fs/cgroup/$name"
  mount -t cgroup -o "$opts" cgroup "/sys/fs/cgroup/$name"
done
if [ -n "$V2" ]; then mkdir /sys/fs/cgroup/unified; mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified; fi
hostname kata-rs-systemd
exec env container=kata-rs-test SYSTEMD_UNIT_PATH="$DIR/units" /lib/systemd/systemd --system --unit=kata-test.target
"#;

/// The host's v1 hierarchies as mount options (`cpu`, `none,name=systemd`)
/// and whether it has a v2 tree beside them.
fn host_hierarchies() -> (Vec<String>, bool) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (mut v1, mut v2) = (vec![], false);
    for l in info.lines() {
        let Some((left, right)) = l.split_once(" - ") else {
            continue;
        };
        let mp = left.split_whitespace().nth(4).unwrap_or("");
        if !mp.starts_with("/sys/fs/cgroup") {
            continue;
        }
        let mut r = right.split_whitespace();
        match r.next() {
            Some("cgroup") => {
                let opts = r.nth(1).unwrap_or("");
                let keep: Vec<&str> = opts
                    .split(',')
                    .filter(|o| {
                        !matches!(*o, "rw" | "ro" | "relatime" | "nosuid" | "nodev" | "noexec")
                    })
                    .collect();
                let name = keep.iter().find_map(|o| o.strip_prefix("name="));
                v1.push(match name {
                    Some(n) => format!("none,name={n}"),
                    None => keep.join(","),
                });
            }
            Some("cgroup2") => v2 = true,
            _ => {}
        }
    }
    (v1, v2)
}

impl PrivateSystemd {
    /// Starts it and waits (up to 30 s) until its D-Bus system bus listens.
    pub fn start() -> PrivateSystemd {
        crate::require_root();
        for tool in [
            "unshare",
            "nsenter",
            "/lib/systemd/systemd",
            "/usr/bin/dbus-daemon",
        ] {
            if tool.starts_with('/') {
                assert!(
                    Path::new(tool).exists(),
                    "{tool} is missing: install Debian's systemd and dbus packages"
                );
            } else {
                crate::containerd::require_tool(tool);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let units = dir.path().join("units");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::write(
            units.join("kata-test.target"),
            "[Unit]\nDescription=kata-rs tests' private systemd\nWants=dbus.socket dbus.service\n",
        )
        .unwrap();
        for u in UNITS_FROM_DEBIAN {
            std::fs::copy(Path::new("/lib/systemd/system").join(u), units.join(u))
                .unwrap_or_else(|e| panic!("{u}: {e}"));
        }
        let run = kata_proto::paths::run_dir();
        // the sandboxes, the private containerds, ctr's stdio FIFOs
        let binds: Vec<String> = [
            run.as_path(),
            Path::new(crate::containerd::BASE_DIR),
            Path::new("/run/containerd/fifo"),
        ]
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d).unwrap();
            let rel = d.strip_prefix("/run").unwrap_or_else(|_| {
                panic!(
                    "{} is not below /run: the private systemd's /run cannot show it",
                    d.display()
                )
            });
            rel.display().to_string()
        })
        .collect();
        let cgroup = format!("kata-rs-systemd-{}", std::process::id());
        let (v1, v2) = host_hierarchies();
        let unshare = Command::new("sh")
            .arg("-ec")
            .arg(LAUNCH)
            .env("CG", &cgroup)
            .env("INNER", INNER)
            .env("DIR", dir.path())
            .env("V1", v1.join(" "))
            .env("V2", if v2 { "1" } else { "" })
            .env("RUN_BINDS", binds.join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start unshare");
        let mut me = PrivateSystemd {
            pid: 0,
            cgroup,
            unshare,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // (the launch script's own children come and go first: only
            // systemd counts)
            me.pid = systemd_of(me.unshare.id()).unwrap_or(0);
            if me.pid != 0
                && Path::new(&format!("/proc/{}/root/run/dbus/system_bus_socket", me.pid)).exists()
            {
                return me;
            }
            if let Ok(Some(st)) = me.unshare.try_wait() {
                panic!("the private systemd ended: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "the private systemd's D-Bus did not come up in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// systemd's pid (in this PID namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The host cgroup its namespace is rooted at (relative to each
    /// hierarchy's root).
    pub fn cgroup(&self) -> &str {
        &self.cgroup
    }

    /// `cmd args` run inside its namespaces (e.g. `systemctl`); its output.
    pub fn run(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        let pid = self.pid.to_string();
        let mut a = vec!["-t", pid.as_str(), "-m", "-p", "-C", "-u", "--", cmd];
        a.extend_from_slice(args);
        Command::new("nsenter").args(&a).output().expect("nsenter")
    }
}

/// The systemd that `unshare --fork` (pid `pid`) started, once it runs.
fn systemd_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == "systemd")
        })
}

/// Removes `dir` and every cgroup below it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("private systemd: cannot remove {}", dir.display());
}

impl Drop for PrivateSystemd {
    fn drop(&mut self) {
        if self.pid == 0 {
            self.pid = systemd_of(self.unshare.id()).unwrap_or(0);
        }
        if self.pid != 0 {
            let _ = self.run("systemctl", &["--force", "exit"]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.unshare.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(None) = self.unshare.try_wait() {
            eprintln!(
                "private systemd {}: no exit 10 s after `systemctl --force exit`: killing its namespace",
                self.pid
            );
            if self.pid != 0 {
                let p = nix::unistd::Pid::from_raw(self.pid as i32);
                let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            }
            // never wait unbounded: unshare itself goes too
            std::thread::sleep(Duration::from_millis(200));
            if let Ok(None) = self.unshare.try_wait() {
                let _ = self.unshare.kill();
            }
            let _ = self.unshare.wait();
        }
        let roots: Vec<PathBuf> = kata_vmm_launcher::client::cgroup_hierarchies();
        for h in roots {
            remove_cgroup_tree(&h.join(&self.cgroup));
        }
    }
}
