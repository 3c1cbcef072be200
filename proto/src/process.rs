//! Host process helpers the kata-rs programs share: telling a process from a
//! later one that reused its pid, and killing only the process one started.

use std::time::Duration;

/// Start time of `pid` (clock ticks since boot, field 22 of
/// `/proc/PID/stat`), if it runs: with the pid, it names one process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may hold spaces and parentheses: fields start after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// SIGKILLs `pid` if it is still the process that started at `start` (clock
/// ticks since boot; a reused pid is left alone), and waits up to 2 s for it
/// to be gone.
pub fn kill_if_same(pid: u32, start: u64) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if raw == 0 || start_time(pid) != Some(start) {
        return;
    }
    // SAFETY: kill(2) sends a signal; no memory is involved.
    unsafe { libc::kill(raw, libc::SIGKILL) };
    for _ in 0..100 {
        if start_time(pid) != Some(start) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes the child of `cmd` die with its parent (SIGKILL when the thread
/// that spawned it ends): helpers never outlive the program that runs them.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether `pid` runs `program` (its command line names it).
pub fn runs_program(pid: u32, program: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(program))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }

    #[test]
    fn kill_if_same_spares_another_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // until the child has exec'd, its command line is the test binary's
        for _ in 0..200 {
            if runs_program(pid, "sleep") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let start = start_time(pid).unwrap();
        assert!(runs_program(pid, "sleep"));
        assert!(!runs_program(pid, "kata-vmm-launcher"));
        // another start time: not the same process, left alone
        kill_if_same(pid, start + 1);
        assert!(child.try_wait().unwrap().is_none());
        kill_if_same(pid, start);
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }
}
