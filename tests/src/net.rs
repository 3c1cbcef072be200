//! Network namespaces the tests make themselves (a pod's and a peer's, joined
//! by a veth pair), with `ip` from iproute2; removed on drop. Addresses are
//! private (10.201.0.0/16), and no traffic leaves the namespaces.

use std::path::PathBuf;
use std::process::Command;

/// Runs `ip` with `args`; panics with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `tc` with `args`; panics with its stderr on failure.
pub fn tc(args: &[&str]) -> String {
    run("tc", args)
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| {
        let package = if prog == "nsenter" {
            "util-linux"
        } else {
            "iproute2"
        };
        panic!("{prog} is missing ({e}): install {package}")
    });
    assert!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Makes `name` (a stale one of that name is removed first), with `lo` up.
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Netns { name: name.into() }
    }

    /// Its path.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// `tc -n <name> args...`.
    pub fn tc(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        tc(&a)
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> String {
        let out = self.ip(&["-o", "link", "show", dev]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {dev} in {out}"))
            .to_string()
    }

    /// The names of its links.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

/// A busybox httpd in a namespace, killed (by pid) on drop.
pub struct Httpd(std::process::Child);

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Netns {
    /// Starts busybox httpd in the namespace, listening on `listen` (`PORT`
    /// or `ADDR:PORT`), serving `dir`.
    pub fn httpd(&self, listen: &str, dir: &std::path::Path) -> Httpd {
        let child = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "busybox", "httpd", "-f", "-p", listen, "-h",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("busybox httpd in a test netns");
        std::thread::sleep(std::time::Duration::from_millis(200));
        Httpd(child)
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay
    /// there) and returns its result.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open a test netns");
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&ns),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("setns into a test netns");
            f()
        })
        .join()
        .expect("the thread in a test netns")
    }
}

/// Runs `ip` with `args` in the network namespace of process `pid`.
pub fn ip_in_pid(pid: u32, args: &[&str]) -> String {
    let net = format!("--net=/proc/{pid}/ns/net");
    let mut a = vec![net.as_str(), "ip"];
    a.extend_from_slice(args);
    run("nsenter", &a)
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A pod netns and a peer netns joined by a veth pair: `eth0` in the pod
/// with `10.201.<net>.2/24` and a default route via the peer's
/// `10.201.<net>.1/24` on `peer0`.
pub struct PodNet {
    /// The pod's namespace.
    pub pod: Netns,
    /// The peer's namespace.
    pub peer: Netns,
    /// The third octet of the /24.
    pub net: u8,
}

impl PodNet {
    /// Makes both namespaces, named after `tag` and this process.
    pub fn new(tag: &str, net: u8) -> PodNet {
        let pid = std::process::id();
        let pod = Netns::new(&format!("kr-{tag}-{pid}"));
        let peer = Netns::new(&format!("kr-{tag}p-{pid}"));
        let a = format!("kr{net}a{}", pid % 100_000);
        let b = format!("kr{net}b{}", pid % 100_000);
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ip(&["link", "set", &a, "netns", &pod.name]);
        ip(&["link", "set", &b, "netns", &peer.name]);
        pod.ip(&["link", "set", &a, "name", "eth0"]);
        peer.ip(&["link", "set", &b, "name", "peer0"]);
        pod.ip(&["addr", "add", &format!("10.201.{net}.2/24"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["addr", "add", &format!("10.201.{net}.1/24"), "dev", "peer0"]);
        peer.ip(&["link", "set", "peer0", "up"]);
        pod.ip(&["route", "add", "default", "via", &format!("10.201.{net}.1")]);
        PodNet { pod, peer, net }
    }

    /// `10.201.<net>.<host>`.
    pub fn addr(&self, host: u8) -> String {
        format!("10.201.{}.{host}", self.net)
    }
}

/// A bridge in a namespace of its own (a switch, as CNI's bridge plugin
/// makes on a node) with one port per pod namespace: `eth0` there has
/// `10.201.<net>.<10+i>/24` and a default route via the bridge's
/// `10.201.<net>.1`.
pub struct BridgeNet {
    /// The switch's namespace (the bridge `br0`).
    pub switch: Netns,
    /// The pods' namespaces.
    pub pods: Vec<Netns>,
    /// The third octet of the /24.
    pub net: u8,
}

impl BridgeNet {
    /// Makes the switch and `n` pod namespaces, named after `tag`.
    pub fn new(tag: &str, net: u8, n: usize) -> BridgeNet {
        let pid = std::process::id() % 100_000;
        let switch = Netns::new(&format!("kr-{tag}s-{pid}"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["addr", "add", &format!("10.201.{net}.1/24"), "dev", "br0"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut pods = vec![];
        for i in 0..n {
            let pod = Netns::new(&format!("kr-{tag}{i}-{pid}"));
            let (a, b) = (format!("kr{net}p{i}a{pid}"), format!("kr{net}p{i}b{pid}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &pod.name]);
            ip(&["link", "set", &b, "netns", &switch.name]);
            pod.ip(&["link", "set", &a, "name", "eth0"]);
            pod.ip(&[
                "addr",
                "add",
                &format!("10.201.{net}.{}/24", 10 + i),
                "dev",
                "eth0",
            ]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "default", "via", &format!("10.201.{net}.1")]);
            switch.ip(&["link", "set", &b, "master", "br0"]);
            switch.ip(&["link", "set", &b, "up"]);
            pods.push(pod);
        }
        BridgeNet { switch, pods, net }
    }

    /// The address of pod `i`.
    pub fn pod_addr(&self, i: usize) -> String {
        format!("10.201.{}.{}", self.net, 10 + i)
    }
}

/// Where Debian's containernetworking-plugins put the plugins.
const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";
/// Where `ctr run --cni` looks for plugins and configurations (fixed in
/// containerd 1.6's ctr).
const CTR_CNI_BIN: &str = "/opt/cni/bin";
const CTR_CNI_CONF: &str = "/etc/cni/net.d";

/// A CNI network `ctr run --cni` uses: the bridge plugin with host-local
/// addresses `10.202.<net>.0/24` (the bridge `kr<net>br` gets `.1` and is
/// the gateway), run by ctr inside the namespace [`Cni::host`] (a node's
/// stand-in: the bridge lives there, not in the machine's own netns). The
/// plugin directory and the configuration are set up for ctr where it
/// looks, and everything the test added is removed on drop.
pub struct Cni {
    /// The namespace ctr and the CNI plugins run in.
    pub host: Netns,
    /// The third octet.
    pub net: u8,
    /// The network's name.
    pub name: String,
    conf_file: PathBuf,
    ipam_dir: tempfile::TempDir,
    made: Vec<PathBuf>,
    /// /opt/cni and /etc/cni are the machine's: one network at a time.
    _one: std::sync::MutexGuard<'static, ()>,
}

static CNI_SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cni {
    /// Sets up the network named after `tag`; panics naming what is missing.
    pub fn new(tag: &str, net: u8) -> Cni {
        let bridge = std::path::Path::new(DEBIAN_CNI_BIN).join("bridge");
        assert!(
            bridge.exists(),
            "{} is missing: install Debian's containernetworking-plugins (make deps)",
            bridge.display()
        );
        let one = CNI_SETUP.lock().unwrap_or_else(|p| p.into_inner());
        let mut made = vec![];
        let bin = std::path::Path::new(CTR_CNI_BIN);
        if !bin.exists() && std::fs::symlink_metadata(bin).is_err() {
            if !bin.parent().is_some_and(|p| p.exists()) {
                std::fs::create_dir_all(bin.parent().unwrap()).expect("mkdir /opt/cni");
                made.push(bin.parent().unwrap().to_path_buf());
            }
            std::os::unix::fs::symlink(DEBIAN_CNI_BIN, bin).expect("symlink /opt/cni/bin");
            made.push(bin.to_path_buf());
        } else {
            for p in ["bridge", "host-local", "loopback"] {
                let at = bin.join(p);
                if std::fs::symlink_metadata(&at).is_err() {
                    std::os::unix::fs::symlink(std::path::Path::new(DEBIAN_CNI_BIN).join(p), &at)
                        .expect("symlink a CNI plugin");
                    made.push(at);
                }
            }
        }
        // libcni keeps results under /var/lib/cni: removed if the test made it
        if !std::path::Path::new("/var/lib/cni").exists() {
            made.insert(0, PathBuf::from("/var/lib/cni"));
            made.insert(1, PathBuf::from("/var/lib/cni/results"));
        }
        let conf = std::path::Path::new(CTR_CNI_CONF);
        if !conf.exists() {
            let etc_cni = conf.parent().unwrap();
            let had_parent = etc_cni.exists();
            std::fs::create_dir_all(conf).expect("mkdir /etc/cni/net.d");
            if !had_parent {
                made.push(etc_cni.to_path_buf());
            }
            made.push(conf.to_path_buf());
        }
        let pid = std::process::id() % 100_000;
        let host = Netns::new(&format!("kr-{tag}h-{pid}"));
        let name = format!("kata-rs-test-{tag}-{pid}");
        let ipam_dir = tempfile::tempdir().expect("tempdir");
        // first in name order: ctr takes the first configuration it finds
        let conf_file = conf.join(format!("00-{name}.conflist"));
        let text = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "bridge",
                "bridge": format!("kr{net}br"),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("10.202.{net}.0/24") }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir.path(),
                }
            }]
        });
        std::fs::write(&conf_file, text.to_string()).expect("write the CNI configuration");
        Cni {
            host,
            net,
            name,
            conf_file,
            ipam_dir,
            made,
            _one: one,
        }
    }

    /// The gateway, `10.202.<net>.1`.
    pub fn gateway(&self) -> String {
        format!("10.202.{}.1", self.net)
    }

    /// The addresses host-local has handed out and not got back.
    pub fn leases(&self) -> Vec<String> {
        let dir = self.ipam_dir.path().join(&self.name);
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cni {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.conf_file);
        // libcni's cache of results, per network
        if let Ok(d) = std::fs::read_dir("/var/lib/cni/results") {
            for e in d.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        for p in self.made.iter().rev() {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir(p));
        }
    }
}
