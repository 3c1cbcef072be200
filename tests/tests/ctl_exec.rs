//! `kata-ctl exec`: the debug console from the host, through a real terminal
//! (tmux runs kata-ctl, send-keys types, capture-pane reads), one command
//! with its exit status, a pod without the console, and ids that name no
//! pod or several. Needs root, containerd, QEMU and tmux (`make test`
//! installs them).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kata_tests::containerd::Containerd;
use kata_tests::shim::{assert_pod_gone, kill_and_delete, wait_task_status, write_config};

const RUNTIME: &str = "io.containerd.kata.v2";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ctl(args: &[&str]) -> Output {
    Command::new(kata_tests::bin("kata-ctl"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("kata-ctl runs")
}

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn start(dir: &Path) -> Tmux {
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let o = t.cmd(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            "sh",
        ]);
        assert!(o.status.success(), "tmux: {}", text(&o.stderr));
        t
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("PS1", "host$ ")
            .output()
            .expect("tmux is installed (make test installs it)")
    }

    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "t"];
        a.extend_from_slice(keys);
        assert!(self.cmd(&a).status.success());
    }

    /// The pane's history and screen (a program may clear the screen).
    fn screen(&self) -> String {
        text(
            &self
                .cmd(&["capture-pane", "-p", "-S", "-", "-t", "t"])
                .stdout,
        )
    }

    fn wait_for(&self, what: impl Fn(&str) -> bool, label: &str) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if what(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{label} on the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// Whether `screen` shows `out`, which only the command's evaluation can
/// print (the command typed is `echo $((...))`: its echo never contains it;
/// keys typed ahead may put a prompt before it on its line).
fn printed(screen: &str, out: &str) -> bool {
    screen
        .lines()
        .any(|l| l.contains(out) && !l.contains("echo"))
}

#[test]
fn kata_ctl_exec_in_a_terminal_and_for_one_command() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let on = "console-on-pod";
    let off = "console-off-pod";
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.katacontainers.config.agent.debug_console_enabled=true",
        &image,
        on,
        "sleep",
        "600",
    ]);
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        &image,
        off,
        "sleep",
        "600",
    ]);
    wait_task_status(&c, on, "RUNNING", Duration::from_secs(90));
    wait_task_status(&c, off, "RUNNING", Duration::from_secs(90));

    // a real terminal: tmux runs a host shell, kata-ctl exec in it (by a
    // unique prefix of the id)
    let tmux = Tmux::start(tmp.path());
    let pane = text(
        &tmux
            .cmd(&["display", "-p", "-t", "t", "#{pane_height} #{pane_width}"])
            .stdout,
    );
    let exec = format!("{} exec console-on", kata_tests::bin("kata-ctl").display());
    tmux.keys(&[&exec, "Enter"]);
    tmux.wait_for(|s| s.contains("kata#"), "the guest's prompt");
    tmux.keys(&["echo $((6*7))", "Enter"]);
    tmux.wait_for(|s| printed(s, "42"), "42");
    tmux.keys(&["stty size", "Enter"]);
    let s = tmux.wait_for(
        |s| printed(s, pane.trim()),
        &format!("the pane's size {pane:?} from stty size"),
    );
    assert!(s.contains("kata#"), "{s}");
    // Ctrl-] leaves, back to the host shell
    tmux.keys(&["C-]"]);
    tmux.wait_for(|s| s.contains("left the console"), "the way out");
    // kata-ctl has ended: the pane runs the host shell again
    let t0 = Instant::now();
    loop {
        let cmd = text(
            &tmux
                .cmd(&["display", "-p", "-t", "t", "#{pane_current_command}"])
                .stdout,
        );
        if cmd.trim() == "sh" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the pane still runs {cmd:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tmux.keys(&["echo back-$((1+1))", "Enter"]);
    tmux.wait_for(
        |s| s.lines().any(|l| l.trim() == "back-2"),
        "the host shell again",
    );
    drop(tmux);

    // one command: its output and its exit status
    let o = ctl(&[
        "exec",
        on,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");
    let o = ctl(&["exec", on, "--", "/no/such/program"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o.stderr));

    // the console disabled: a clear error saying how to enable it
    let o = ctl(&["exec", off, "--", "true"]);
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("debug_console_enabled = true"),
        "{err}"
    );
    // no pod, or an id that names two
    let o = ctl(&["exec", "no-such-pod"]);
    assert!(
        text(&o.stderr).contains("no pod no-such-pod on this host"),
        "{}",
        text(&o.stderr)
    );
    let o = ctl(&["exec", "console-o"]);
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("ambiguous") && err.contains(on) && err.contains(off),
        "{err}"
    );

    kill_and_delete(&c, on);
    kill_and_delete(&c, off);
    assert_pod_gone(on, Duration::from_secs(30));
    assert_pod_gone(off, Duration::from_secs(30));
}
