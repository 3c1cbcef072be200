//! A private containerd 1.6 for the end-to-end tests and the benchmarks.
//!
//! Each [`Containerd`] has its own directory under [`BASE_DIR`] holding its
//! `config.toml`, `root/`, `state/`, gRPC socket `c.sock` (ttrpc `c.sock.ttrpc`)
//! and `containerd.log`. Its `PATH` starts with the kata-rs binaries
//! (`KATA_TEST_BIN_DIR`), so `--runtime io.containerd.kata.v2` finds
//! `containerd-shim-kata-v2`; `io.containerd.runc.v2` (runc) works too, for
//! comparisons. The CRI plugin is off unless [`Builder::cri`] turns it on;
//! the snapshotters other than overlayfs and native are disabled.
//!
//! Dropping it deletes what is left of its tasks and containers (through ctr),
//! stops containerd by PID (SIGTERM, then SIGKILL), ends any shim of its that
//! still runs (found by its unique `-address`), unmounts what is still mounted
//! under its directory and removes the directory. containerd 1.6 also writes
//! `/run/containerd/{s,fifo,runc}` whatever its config says; those are shared
//! with any other containerd and are left alone.
//!
//! ```no_run
//! let c = kata_tests::containerd::Containerd::start();
//! let image = c.import_busybox();
//! let out = c.ctr_ok(&["run", "--rm", &image, "hello", "echo", "hello"]);
//! assert_eq!(out.trim(), "hello");
//! ```

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the private containerds live (short: unix socket paths have 107 bytes).
pub const BASE_DIR: &str = "/run/kata-rs-test";

/// The namespace [`Containerd::ctr`] uses unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "kata-rs-test";

/// The name `kata-ctl oci-image` gives the busybox image.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:latest";

/// The sandbox (pause) image of a CRI containerd: busybox's `sleep inf`
/// (imported by [`Containerd::import_cri_images`], never pulled).
pub const PAUSE_IMAGE: &str = "kata-rs.test/pause:latest";

/// The containerd namespace of CRI's pods and images.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The CRI runtime handler of kata-rs (`runtimeClassName: kata`).
pub const KATA_HANDLER: &str = "kata";

/// The runtime of kata-rs (containerd finds `containerd-shim-kata-v2` on PATH).
pub const KATA_RUNTIME: &str = "io.containerd.kata.v2";

/// runc's shim, for comparisons.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Plugins a test containerd does without: CRI (slow to start, noisy: on
/// only with [`Builder::cri`]), the
/// snapshotters that cannot work here, tracing, and `opt` (it would create
/// `/opt/containerd`). `io.containerd.runtime.v1.linux` must stay: without it
/// the tasks service does not load.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// Options of a private containerd; [`Builder::start`] starts it.
#[derive(Debug, Clone)]
pub struct Builder {
    env: BTreeMap<OsString, OsString>,
    namespace: String,
    log_level: String,
    start_timeout: Duration,
    ctr_timeout: Duration,
    namespaces_of: Option<u32>,
    netns: Option<PathBuf>,
    cri: Option<Cri>,
}

/// The CRI plugin's settings of a private containerd.
#[derive(Debug, Clone)]
struct Cri {
    /// The `kata` handler's `ConfigPath` option.
    kata_config: PathBuf,
    /// Its `pod_annotations` (and `container_annotations`).
    annotations: Vec<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            env: BTreeMap::new(),
            namespace: DEFAULT_NAMESPACE.into(),
            log_level: "info".into(),
            start_timeout: Duration::from_secs(20),
            ctr_timeout: Duration::from_secs(300),
            namespaces_of: None,
            netns: None,
            cri: None,
        }
    }
}

impl Builder {
    /// An environment variable for containerd, which its shims inherit (e.g.
    /// `KATA_CONF_FILE`). `PATH` is not one: it is always the kata-rs binary
    /// directory followed by this process's `PATH`.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .insert(key.as_ref().to_owned(), value.as_ref().to_owned());
        self
    }

    /// `KATA_CONF_FILE` for the shims.
    pub fn kata_config(self, path: impl AsRef<Path>) -> Self {
        self.env("KATA_CONF_FILE", path.as_ref())
    }

    /// The namespace of [`Containerd::ctr`] (default [`DEFAULT_NAMESPACE`]).
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }

    /// containerd's log level (default `info`; `debug` also makes containerd
    /// start the shims with `-debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// How long containerd may take to answer (default 20 s).
    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.start_timeout = t;
        self
    }

    /// How long one `ctr` command may take before the test fails (default 300 s).
    pub fn ctr_timeout(mut self, t: Duration) -> Self {
        self.ctr_timeout = t;
        self
    }

    /// Runs containerd (and so its shims and theirs) in the PID, mount and
    /// cgroup namespaces of process `pid`: e.g. a private systemd's
    /// ([`crate::systemd`]), whose D-Bus socket and cgroup tree they then
    /// see. [`Containerd::pid`] is still its pid in this PID namespace.
    pub fn namespaces_of(mut self, pid: u32) -> Self {
        self.namespaces_of = Some(pid);
        self
    }

    /// Runs containerd (and so the CNI plugins CRI runs) in the network
    /// namespace at `path`: a namespace the test made, standing in for the
    /// node's, so a CRI pod network's bridge lives there.
    pub fn netns(mut self, path: impl AsRef<Path>) -> Self {
        self.netns = Some(path.as_ref().to_path_buf());
        self
    }

    /// Turns containerd's CRI plugin on, configured as docs/install.md tells
    /// a user to: the runtime handler `kata` (`io.containerd.kata.v2`, its
    /// `ConfigPath` option naming `kata_config`, `io.katacontainers.*` pod
    /// and container annotations passed through) beside `runc` (the
    /// default); [`PAUSE_IMAGE`] as the sandbox image; the pod network a
    /// CNI bridge `kcri0` (10.203.0.0/24, host-local addresses kept in this
    /// containerd's directory) from Debian's plugins. Start it in a
    /// namespace of the test's own ([`Builder::netns`]) so the bridge lives
    /// there. Its readiness is waited for too.
    pub fn cri(mut self, kata_config: impl AsRef<Path>) -> Self {
        self.cri = Some(Cri {
            kata_config: kata_config.as_ref().to_path_buf(),
            annotations: vec!["io.katacontainers.*".into()],
        });
        self
    }

    /// Starts containerd and waits until it answers; panics (with the tail of
    /// its log) if it does not within the start timeout.
    pub fn start(self) -> Containerd {
        crate::require_root();
        let containerd = require_tool("containerd");
        require_tool("ctr");
        let bin_dir = bin_dir();
        let dir = fresh_dir();
        let c = Layout::new(&dir);
        for d in [&c.root, &c.state] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        let mut config = config_toml(&c, &self.log_level, self.cri.is_some());
        if let Some(cri) = &self.cri {
            config.push_str(&cri_toml(&c, cri));
            let net_d = c.cni_conf_dir();
            std::fs::create_dir_all(&net_d)
                .unwrap_or_else(|e| panic!("create {}: {e}", net_d.display()));
            std::fs::write(net_d.join("10-kata-rs-cri.conflist"), cni_conflist(&c))
                .unwrap_or_else(|e| panic!("write the CNI configuration: {e}"));
        }
        std::fs::write(&c.config, config)
            .unwrap_or_else(|e| panic!("write {}: {e}", c.config.display()));
        let log = std::fs::File::create(&c.log)
            .unwrap_or_else(|e| panic!("create {}: {e}", c.log.display()));
        let log2 = log.try_clone().expect("dup the log file");
        let path = match std::env::var_os("PATH") {
            Some(p) if !p.is_empty() => {
                let mut s = bin_dir.clone().into_os_string();
                s.push(":");
                s.push(p);
                s
            }
            _ => format!("{}:{DEFAULT_PATH}", bin_dir.display()).into(),
        };
        // in another process's namespaces: through nsenter, which forks
        // (a process cannot start threads in a PID namespace it has not
        // entered itself, so containerd must be born there)
        let mut enter: Vec<OsString> = vec![];
        if let Some(pid) = self.namespaces_of {
            enter.extend(["-t", &pid.to_string(), "-p", "-m", "-C"].map(OsString::from));
        }
        if let Some(netns) = &self.netns {
            let mut a = OsString::from("--net=");
            a.push(netns);
            enter.push(a);
        }
        let nsenter = !enter.is_empty();
        let mut cmd = if nsenter {
            let mut c = Command::new(require_tool("nsenter"));
            c.args(enter).arg("--").arg(&containerd);
            c
        } else {
            Command::new(&containerd)
        };
        cmd.arg("--config")
            .arg(&c.config)
            .current_dir(&dir)
            .env("PATH", path)
            .envs(self.env.iter().filter(|(k, _)| k.as_os_str() != "PATH"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", containerd.display()));
        let pid = if nsenter && self.namespaces_of.is_some() {
            // containerd is nsenter's child (it forks to enter a PID namespace)
            child_of(child.id(), Duration::from_secs(5))
                .unwrap_or_else(|| panic!("nsenter {} started no containerd", child.id()))
        } else {
            // nsenter execs containerd when it enters no PID namespace
            child.id()
        };
        let mut me = Containerd {
            pid,
            child: Some(child),
            layout: c,
            dir,
            namespace: self.namespace,
            ctr_timeout: self.ctr_timeout,
            ready: false,
            cri: self.cri.is_some(),
        };
        me.wait_ready(self.start_timeout);
        if self.cri.is_some() {
            crate::cri::Cri::connect(&me.layout.address).wait_ready(self.start_timeout);
        }
        me
    }
}

/// The paths of one private containerd.
#[derive(Debug, Clone)]
struct Layout {
    config: PathBuf,
    root: PathBuf,
    state: PathBuf,
    address: PathBuf,
    log: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        Layout {
            config: dir.join("config.toml"),
            root: dir.join("root"),
            state: dir.join("state"),
            address: dir.join("c.sock"),
            log: dir.join("containerd.log"),
        }
    }

    /// CRI's CNI configuration directory.
    fn cni_conf_dir(&self) -> PathBuf {
        self.config.with_file_name("net.d")
    }
}

/// The config.toml (version 2) of a private containerd.
fn config_toml(l: &Layout, log_level: &str, cri: bool) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let disabled: Vec<String> = DISABLED_PLUGINS
        .iter()
        .filter(|p| !(cri && **p == "io.containerd.grpc.v1.cri"))
        .map(|p| format!("{p:?}"))
        .collect();
    format!(
        "# a private containerd of the kata-rs tests\n\
         version = 2\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [{disabled}]\n\
         \n\
         [grpc]\n  address = {sock}\n\
         \n\
         [ttrpc]\n  address = {ttrpc}\n\
         \n\
         [debug]\n  level = {level:?}\n\
         \n\
         [metrics]\n  address = \"\"\n",
        root = q(&l.root),
        state = q(&l.state),
        disabled = disabled.join(", "),
        sock = q(&l.address),
        ttrpc = q(&l.address.with_extension("sock.ttrpc")),
        level = log_level,
    )
}

/// The CRI plugin's section: what docs/install.md gives a user, plus what
/// keeps a test's containerd to itself (no AppArmor profile loaded, pod
/// network namespaces under its state directory, the streaming server on
/// loopback at a free port).
fn cri_toml(l: &Layout, cri: &Cri) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let globs: Vec<String> = cri.annotations.iter().map(|a| format!("{a:?}")).collect();
    let globs = globs.join(", ");
    format!(
        "\n         [plugins.\"io.containerd.grpc.v1.cri\"]\n         \x20 sandbox_image = {PAUSE_IMAGE:?}\n         \x20 disable_apparmor = true\n         \x20 restrict_oom_score_adj = true\n         \x20 netns_mounts_under_state_dir = true\n         \x20 stream_server_address = \"127.0.0.1\"\n         \x20 stream_server_port = \"0\"\n         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n         \x20 snapshotter = \"overlayfs\"\n         \x20 default_runtime_name = \"runc\"\n         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n         \x20 runtime_type = {RUNC_RUNTIME:?}\n         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{KATA_HANDLER}]\n         \x20 runtime_type = {KATA_RUNTIME:?}\n         \x20 privileged_without_host_devices = true\n         \x20 pod_annotations = [{globs}]\n         \x20 container_annotations = [{globs}]\n         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{KATA_HANDLER}.options]\n         \x20 ConfigPath = {config}\n         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n         \x20 bin_dir = \"/usr/lib/cni\"\n         \x20 conf_dir = {net_d}\n         \x20 max_conf_num = 1\n",
        config = q(&cri.kata_config),
        net_d = q(&l.cni_conf_dir()),
    )
}

/// The pod network of a CRI containerd: a bridge with host-local addresses
/// (kept in the containerd's directory, not /var/lib/cni/networks).
fn cni_conflist(l: &Layout) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "kata-rs-cri",
        "plugins": [{
            "type": "bridge",
            "bridge": "kcri0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.203.0.0/24" }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": l.config.with_file_name("ipam"),
            }
        }]
    })
    .to_string()
}

/// A private containerd; dropping it stops it and removes all of it.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    pid: u32,
    layout: Layout,
    dir: PathBuf,
    namespace: String,
    ctr_timeout: Duration,
    ready: bool,
    cri: bool,
}

impl Containerd {
    /// A containerd with the default options.
    pub fn start() -> Containerd {
        Builder::default().start()
    }

    /// Options first: `Containerd::builder().kata_config(p).start()`.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Its directory (config, root, state, socket, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its gRPC socket (`ctr -a`).
    pub fn address(&self) -> &Path {
        &self.layout.address
    }

    /// Its root directory (content, snapshots, metadata).
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    /// Its state directory (bundles of the running tasks).
    pub fn state(&self) -> &Path {
        &self.layout.state
    }

    /// Its config file.
    pub fn config(&self) -> &Path {
        &self.layout.config
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The namespace `ctr` commands use.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Changes the namespace of later `ctr` commands.
    pub fn set_namespace(&mut self, ns: &str) {
        self.namespace = ns.into();
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.layout.log
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.layout.log, lines)
    }

    /// Runs `ctr -a SOCK -n NAMESPACE ARGS...`. Panics if ctr cannot be run or
    /// takes longer than the ctr timeout (the ctr process is killed then).
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_input(args, None)
    }

    /// Like [`Containerd::ctr`], with `input` on ctr's stdin.
    pub fn ctr_input(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut cmd = self.ctr_command(&self.namespace);
        cmd.args(args);
        match run_bounded(cmd, input, self.ctr_timeout) {
            Ok(o) => o,
            Err(e) => panic!(
                "ctr {}: {e}\n--- containerd log ({}), last lines:\n{}",
                args.join(" "),
                self.layout.log.display(),
                self.log_tail(40)
            ),
        }
    }

    /// Runs ctr and returns its stdout; panics with its exit status, stdout,
    /// stderr and the tail of containerd's log if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        self.check(args, out)
    }

    /// Like [`Containerd::ctr_ok`], with ctr run in the network namespace
    /// `netns` (`ip netns exec`): what `--cni` runs (the CNI plugins) acts
    /// from there.
    pub fn ctr_ok_in_netns(&self, netns: &str, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "ctr", "-a"])
            .arg(&self.layout.address)
            .arg("-n")
            .arg(&self.namespace)
            .args(args);
        let out = run_bounded(cmd, None, self.ctr_timeout)
            .unwrap_or_else(|e| panic!("ctr {}: {e}", args.join(" ")));
        self.check(args, out)
    }

    fn check(&self, args: &[&str], out: Output) -> String {
        if !out.status.success() {
            panic!(
                "ctr {} failed ({}):\n--- stdout:\n{}\n--- stderr:\n{}\n--- containerd log ({}), last lines:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.layout.log.display(),
                self.log_tail(40)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `ctr` command aimed at this containerd, namespace `ns`.
    pub fn ctr_command(&self, ns: &str) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.layout.address).arg("-n").arg(ns);
        cmd
    }

    /// Imports the busybox image (built once per process with `kata-ctl
    /// oci-image`) into the current namespace; returns its name.
    pub fn import_busybox(&self) -> String {
        let tar = busybox_tar();
        let args = ["image", "import", "-"];
        let out = self.ctr_input(&args, Some(tar));
        self.check(&args, out);
        let list = self.ctr_ok(&["image", "ls", "-q"]);
        assert!(
            list.lines().any(|l| l.trim() == BUSYBOX_IMAGE),
            "after the import, ctr image ls has no {BUSYBOX_IMAGE}:\n{list}"
        );
        BUSYBOX_IMAGE.to_string()
    }

    /// Imports the busybox image and the sandbox image [`PAUSE_IMAGE`]
    /// (busybox's `sleep inf`, built by `kata-ctl oci-image --cmd sleep
    /// --cmd inf`) into CRI's namespace, and waits until CRI's image store
    /// has both (it learns of them from events: a pod started before
    /// would make CRI try to pull). Returns the busybox image's name.
    pub fn import_cri_images(&self) -> String {
        for (name, tar) in [(BUSYBOX_IMAGE, busybox_tar()), (PAUSE_IMAGE, pause_tar())] {
            let mut cmd = self.ctr_command(CRI_NAMESPACE);
            cmd.args(["image", "import", "-"]);
            let out = run_bounded(cmd, Some(tar), self.ctr_timeout)
                .unwrap_or_else(|e| panic!("ctr image import {name}: {e}"));
            self.check(&["image", "import", name], out);
        }
        let mut cri = crate::cri::Cri::connect(&self.layout.address);
        for name in [BUSYBOX_IMAGE, PAUSE_IMAGE] {
            cri.wait_image(name, Duration::from_secs(20));
        }
        BUSYBOX_IMAGE.to_string()
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "containerd exited at start ({st}); its log ({}):\n{}",
                        self.layout.log.display(),
                        self.log_tail(40)
                    );
                }
            }
            if self.layout.address.exists() {
                let mut cmd = self.ctr_command(&self.namespace);
                cmd.arg("version");
                match run_bounded(cmd, None, Duration::from_secs(5)) {
                    Ok(o) if o.status.success() => {
                        self.ready = true;
                        return;
                    }
                    Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => last = e,
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd (pid {}) did not answer `ctr version` within {timeout:?} (last: {last:?}); its log ({}):\n{}",
                    self.pid,
                    self.layout.log.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops and removes the CRI pods left (a failed test's), as the kubelet
    /// would: containerd stops their containers first, then the sandbox,
    /// and tears the pod network down.
    fn remove_cri_pods(&self) {
        let Ok(mut cri) = crate::cri::Cri::try_connect(&self.layout.address) else {
            return;
        };
        cri.set_timeout(Duration::from_secs(60));
        let pods = cri
            .list_pod_sandbox(Default::default())
            .map(|r| r.items)
            .unwrap_or_default();
        for p in pods {
            eprintln!(
                "containerd {}: removing leftover CRI pod {}",
                self.pid, p.id
            );
            if let Err(e) = cri.stop_and_remove_pod(&p.id) {
                eprintln!("containerd {}: {e}", self.pid);
            }
        }
    }

    /// Deletes the tasks and containers left in every namespace (bounded).
    fn delete_leftovers(&self) {
        let bounded = |ns: &str, args: &[&str]| {
            let mut cmd = self.ctr_command(ns);
            cmd.args(args);
            run_bounded(cmd, None, Duration::from_secs(15)).ok()
        };
        let lines = |o: Option<Output>| -> Vec<String> {
            o.filter(|o| o.status.success())
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        for ns in lines(bounded("default", &["namespaces", "ls", "-q"])) {
            for task in lines(bounded(&ns, &["tasks", "ls", "-q"])) {
                eprintln!(
                    "containerd {}: deleting leftover task {ns}/{task}",
                    self.pid
                );
                bounded(&ns, &["tasks", "kill", "-a", "-s", "SIGKILL", &task]);
                bounded(&ns, &["tasks", "delete", "-f", &task]);
            }
            for c in lines(bounded(&ns, &["containers", "ls", "-q"])) {
                bounded(&ns, &["containers", "delete", &c]);
            }
        }
    }

    /// Shims started by this containerd that still run (their command line
    /// names this containerd's socket, which no other one has).
    fn own_shims(&self) -> Vec<u32> {
        let addr = self.layout.address.as_os_str().as_encoded_bytes().to_vec();
        let mut pids = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self.pid {
                continue;
            }
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == addr.as_slice())
                && crate::alive(pid)
            {
                pids.push(pid);
            }
        }
        pids
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!(
                        "containerd {}: no exit 10 s after SIGTERM, sending SIGKILL",
                        self.pid
                    );
                    // containerd itself (under nsenter, the child is nsenter)
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.ready && self.child.is_some() {
            if self.cri {
                self.remove_cri_pods();
            }
            self.delete_leftovers();
        }
        self.stop();
        for pid in self.own_shims() {
            eprintln!(
                "containerd {}: shim pid {pid} still runs after its tasks were deleted; killing it",
                self.pid
            );
            let p = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
        let left = unmount_under(&self.dir);
        if !left.is_empty() {
            eprintln!(
                "containerd {}: still mounted, not removing {}: {left:?}",
                self.pid,
                self.dir.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "containerd {}: remove {}: {e}",
                self.pid,
                self.dir.display()
            );
        }
    }
}

/// Mount points at or under `dir`, from /proc/self/mountinfo, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Unmounts (MNT_DETACH) everything at or under `dir`, deepest first; returns
/// what is still mounted afterwards.
pub fn unmount_under(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..4 {
        let m = mounts_under(dir);
        if m.is_empty() {
            break;
        }
        for p in m {
            if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("umount {}: {e}", p.display());
            }
        }
    }
    mounts_under(dir)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A new, empty directory under [`BASE_DIR`].
fn fresh_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::fs::create_dir_all(BASE_DIR).unwrap_or_else(|e| panic!("create {BASE_DIR}: {e}"));
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let d = Path::new(BASE_DIR).join(format!(
            "{}-{}-{:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos & 0xffff
        ));
        match std::fs::create_dir(&d) {
            Ok(()) => return d,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {}: {e}", d.display()),
        }
    }
}

/// The kata-rs binary directory (`KATA_TEST_BIN_DIR`).
pub fn bin_dir() -> PathBuf {
    crate::bin("kata-ctl")
        .parent()
        .expect("the binary directory")
        .to_path_buf()
}

/// The first child of `pid`, waited for up to `timeout`.
fn child_of(pid: u32, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
        if let Some(c) = kids
            .ok()
            .and_then(|k| k.split_whitespace().next()?.parse().ok())
        {
            return Some(c);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `name` on PATH, or a panic saying what to install.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .chain(std::env::split_paths(DEFAULT_PATH))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: this test needs containerd 1.6 and ctr \
                 (Debian package `containerd`; `make deps` installs it)"
            )
        })
}

/// The busybox OCI layout tar, built by `kata-ctl oci-image` once per process.
pub fn busybox_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| oci_image_tar(&["--name", BUSYBOX_IMAGE]))
}

/// The sandbox image's OCI layout tar (`kata-ctl oci-image --cmd sleep
/// --cmd inf`), built once per process.
pub fn pause_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| oci_image_tar(&["--name", PAUSE_IMAGE, "--cmd", "sleep", "--cmd", "inf"]))
}

/// `kata-ctl oci-image ARGS --output <tmp>`, read back.
fn oci_image_tar(args: &[&str]) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("image.tar");
    let o = Command::new(crate::bin("kata-ctl"))
        .arg("oci-image")
        .args(args)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("run kata-ctl oci-image");
    assert!(
        o.status.success(),
        "kata-ctl oci-image {} failed ({}): {}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(&out).unwrap_or_else(|e| panic!("read {}: {e}", out.display()))
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` with `input` on stdin, collecting stdout and stderr; kills it
/// (by its PID) if it is not done within `timeout`.
pub fn run_bounded(
    mut cmd: Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let writer = child
        .stdin
        .take()
        .zip(input.map(<[u8]>::to_vec))
        .map(|(mut w, data)| {
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            })
        });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err.join().unwrap_or_default();
                return Err(format!(
                    "{program} did not finish within {timeout:?} (killed); stderr: {}",
                    String::from_utf8_lossy(&stderr)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("wait for {program}: {e}")),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_private_paths() {
        let l = Layout::new(Path::new("/run/kata-rs-test/x"));
        let t = config_toml(&l, "debug", false);
        assert!(t.contains("root = \"/run/kata-rs-test/x/root\""), "{t}");
        assert!(t.contains("state = \"/run/kata-rs-test/x/state\""), "{t}");
        assert!(
            t.contains("address = \"/run/kata-rs-test/x/c.sock\""),
            "{t}"
        );
        assert!(
            t.contains("address = \"/run/kata-rs-test/x/c.sock.ttrpc\""),
            "{t}"
        );
        assert!(t.contains("\"io.containerd.grpc.v1.cri\""), "{t}");
        assert!(!t.contains("runtime.v1.linux"), "{t}");
        assert!(t.contains("level = \"debug\""), "{t}");
    }

    #[test]
    fn cri_config_is_valid_toml_with_the_kata_handler() {
        let l = Layout::new(Path::new("/run/kata-rs-test/x"));
        let cri = Cri {
            kata_config: "/run/kata-rs-test/x/configuration.toml".into(),
            annotations: vec!["io.katacontainers.*".into()],
        };
        let t = config_toml(&l, "info", true) + &cri_toml(&l, &cri);
        let v: toml::Value = toml::from_str(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
        let disabled = v["disabled_plugins"].as_array().unwrap();
        assert!(!disabled
            .iter()
            .any(|p| p.as_str() == Some("io.containerd.grpc.v1.cri")));
        let plugin = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(plugin["sandbox_image"].as_str(), Some(PAUSE_IMAGE));
        let kata = &plugin["containerd"]["runtimes"][KATA_HANDLER];
        assert_eq!(kata["runtime_type"].as_str(), Some(KATA_RUNTIME));
        assert_eq!(
            kata["options"]["ConfigPath"].as_str(),
            Some("/run/kata-rs-test/x/configuration.toml")
        );
        assert_eq!(
            kata["pod_annotations"][0].as_str(),
            Some("io.katacontainers.*")
        );
        assert_eq!(
            plugin["cni"]["conf_dir"].as_str(),
            Some("/run/kata-rs-test/x/net.d")
        );
        let net: serde_json::Value = serde_json::from_str(&cni_conflist(&l)).unwrap();
        assert_eq!(
            net["plugins"][0]["ipam"]["dataDir"],
            "/run/kata-rs-test/x/ipam"
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
