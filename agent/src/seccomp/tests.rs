use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator};

use super::bpf::*;
use super::rules::*;
use super::*;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use serde_json::json;
use std::collections::HashMap;

fn spec(value: serde_json::Value) -> LinuxSeccomp {
    serde_json::from_value(value).expect("valid LinuxSeccomp")
}

fn program(value: serde_json::Value) -> SeccompProgram {
    compile(&spec(value)).expect("profile compiles")
}

fn nr(name: &str) -> i64 {
    syscall_number(name).unwrap_or_else(|| panic!("{name} in the table"))
}

/// (match action, mismatch action, syscall numbers, ENOSYS stub) of each filter, in install
/// order.
fn shape(p: &SeccompProgram) -> Vec<(Action, Action, Vec<i64>, Option<i64>)> {
    p.filters
        .iter()
        .map(|f| {
            (
                f.on_match,
                f.on_mismatch,
                f.syscalls.keys().copied().collect(),
                f.enosys_above,
            )
        })
        .collect()
}

// ---- syscall table ----

#[test]
fn table_numbers() {
    assert_eq!(syscall_number("read"), Some(0));
    assert_eq!(syscall_number("write"), Some(1));
    assert_eq!(syscall_number("openat"), Some(257));
    assert_eq!(syscall_number("mkdir"), Some(83));
    assert_eq!(syscall_number("seccomp"), Some(libc::SYS_seccomp));
    assert_eq!(syscall_number("getcwd"), Some(libc::SYS_getcwd));
    assert_eq!(syscall_number("personality"), Some(libc::SYS_personality));
    assert_eq!(syscall_number("no_such_syscall"), None);
    assert_eq!(syscall_number(""), None);
    assert_eq!(syscall_number("READ"), None);
    assert_eq!(syscall_number("socketcall"), None, "i386-only");
    let t = table::SYSCALL_TABLE;
    assert!(t.len() > 300, "{} syscalls", t.len());
    assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "sorted, unique");
    for &(name, number) in t {
        assert_eq!(syscall_number(name), Some(number));
    }
}

// ---- composition ----

#[test]
fn default_allow_with_errno_rules_is_one_filter() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "rmdir", "not_a_syscall"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
        ]
    }));
    assert_eq!(p.filter_count(), 1);
    assert_eq!(
        shape(&p),
        vec![(
            Action::Errno(1),
            Action::Allow,
            vec![nr("mkdir"), nr("rmdir")],
            None
        )]
    );
}

#[test]
fn nothing_restricted_is_no_filter() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]
    }));
    assert_eq!(p.filter_count(), 0);
    p.install().expect("installing nothing");
    assert_eq!(
        program(json!({"defaultAction": "SCMP_ACT_ALLOW"})).filter_count(),
        0
    );
}

/// The table minus `except`, plus names the table does not know (other arches, newer
/// kernels, typos), as in containerd's default profile.
fn allow_list(except: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = table::SYSCALL_TABLE
        .iter()
        .map(|(name, _)| name.to_string())
        .filter(|name| !except.contains(&name.as_str()))
        .collect();
    names.extend(
        [
            "socketcall",
            "arm_fadvise64_64",
            "no_such_syscall_1",
            "waitpid",
        ]
        .map(String::from),
    );
    names
}

#[test]
fn containerd_like_allow_list() {
    let names = allow_list(&["getcwd", "clone3"]);
    assert!(names.len() > 300);
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
        ]
    }));
    assert_eq!(p.filter_count(), 1);
    let f = &p.filters[0];
    assert_eq!(
        (f.on_match, f.on_mismatch),
        (Action::Allow, Action::Errno(1))
    );
    assert_eq!(f.syscalls.len(), table::SYSCALL_TABLE.len() - 2);
    assert!(!f.syscalls.contains_key(&nr("getcwd")));
    // The unconditional allow absorbs the conditional one.
    assert_eq!(f.syscalls[&nr("personality")], Match::Always);
    let max = table::SYSCALL_TABLE.iter().map(|e| e.1).max();
    assert_eq!(f.enosys_above, max);
    assert!(f.bpf.len() <= BPF_MAXINSNS);

    // With containerd's clone3 → ENOSYS rule: one more filter.
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
        ]
    }));
    let s = shape(&p);
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].0, s[0].1), (Action::Allow, Action::Errno(1)));
    assert!(s[0].2.contains(&nr("clone3")));
    assert_eq!(
        s[1],
        (Action::Errno(38), Action::Allow, vec![nr("clone3")], None)
    );
}

#[test]
fn mixed_actions() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "syscalls": [
            {"names": ["read", "write", "exit_group", "seccomp"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["uname"], "action": "SCMP_ACT_TRAP"},
            {"names": ["kill"], "action": "SCMP_ACT_LOG"},
            {"names": ["getcwd"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 1, "value": 4096, "op": "SCMP_CMP_GE"}]},
            {"names": ["reboot"], "action": "SCMP_ACT_KILL"},
            {"names": ["mount"], "action": "SCMP_ACT_TRACE"},
            // Same action as the default: redundant, dropped (like runc).
            {"names": ["umount2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
        ]
    }));
    let s = shape(&p);
    // Default filter first (no ENOSYS stub: the default is already ENOSYS), then the
    // per-action filters, the first-listed installed last.
    assert_eq!(
        s.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
        vec![
            (Action::Allow, Action::Errno(38)),
            (Action::Trace(1), Action::Allow),
            (Action::KillThread, Action::Allow),
            (Action::Log, Action::Allow),
            (Action::Trap, Action::Allow),
            (Action::Errno(13), Action::Allow),
            (Action::KillProcess, Action::Allow),
        ]
    );
    assert_eq!(s[0].3, None);
    let mut named: Vec<i64> = [
        "read",
        "write",
        "exit_group",
        "seccomp",
        "ptrace",
        "getcwd",
        "uname",
        "kill",
        "reboot",
        "mount",
    ]
    .iter()
    .map(|n| nr(n))
    .collect();
    named.sort();
    assert_eq!(s[0].2, named, "umount2 is not named by the default filter");
    assert_eq!(s[5].2, vec![nr("getcwd")]);
}

#[test]
fn enosys_stub_only_for_restrictive_defaults() {
    let stub = |default: serde_json::Value, errno: Option<u32>| {
        let mut v = json!({
            "defaultAction": default,
            "syscalls": [{"names": ["read", "openat", "nope"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["getcwd"], "action": default}]
        });
        if let Some(errno) = errno {
            v["defaultErrnoRet"] = json!(errno);
        }
        let p = program(v);
        let default_filter = p.filters.iter().find(|f| f.on_match == Action::Allow);
        default_filter.expect("a default filter").enosys_above
    };
    let openat = Some(nr("openat"));
    assert_eq!(stub(json!("SCMP_ACT_ERRNO"), None), openat);
    assert_eq!(stub(json!("SCMP_ACT_ERRNO"), Some(13)), openat);
    assert_eq!(stub(json!("SCMP_ACT_ERRNO"), Some(38)), None);
    assert_eq!(stub(json!("SCMP_ACT_KILL_PROCESS"), None), openat);
    assert_eq!(stub(json!("SCMP_ACT_TRAP"), None), openat);
    assert_eq!(stub(json!("SCMP_ACT_LOG"), None), None);
    assert_eq!(stub(json!("SCMP_ACT_TRACE"), None), None);
    // No known syscall named at all: no stub.
    let p = program(json!({"defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["nope"], "action": "SCMP_ACT_ALLOW"}]}));
    assert_eq!(
        shape(&p),
        vec![(Action::Allow, Action::Errno(1), vec![], None)]
    );
}

#[test]
fn filter_refusing_seccomp_is_installed_last() {
    // Listed first, so it would be installed last anyway: list it second as well.
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["seccomp"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["getpid"], "action": "SCMP_ACT_TRAP"}
        ]
    }));
    let order: Vec<Action> = shape(&p).iter().map(|f| f.0).collect();
    assert_eq!(
        order,
        [Action::Trap, Action::KillProcess, Action::Errno(13)]
    );

    // A condition that cannot hold for SECCOMP_SET_MODE_FILTER does not count.
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["seccomp"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}
        ]
    }));
    let order: Vec<Action> = shape(&p).iter().map(|f| f.0).collect();
    assert_eq!(order, [Action::KillProcess, Action::Errno(1)]);

    // Default filter refusing it (not allowed, ENOSYS stub) goes last too.
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read", "exit_group"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}
        ]
    }));
    let order: Vec<Action> = shape(&p).iter().map(|f| f.1).collect();
    assert_eq!(order, [Action::Allow, Action::Errno(1)]);

    // Two filters that would refuse it: rejected, naming both.
    let err = compile(&spec(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["seccomp"], "action": "SCMP_ACT_TRAP",
             "args": [{"index": 2, "value": 0, "op": "SCMP_CMP_NE"}]}
        ]
    })))
    .unwrap_err();
    assert!(matches!(err, SeccompError::SeccompSyscallRestricted { .. }));
    let msg = err.to_string();
    assert!(msg.contains("SCMP_ACT_TRAP"), "{msg}");
    assert!(msg.contains("default SCMP_ACT_ERRNO(1)"), "{msg}");
    let err = compile(&spec(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["seccomp"], "action": "SCMP_ACT_TRAP"},
            {"names": ["seccomp"], "action": "SCMP_ACT_LOG"},
            {"names": ["seccomp"], "action": "SCMP_ACT_ERRNO"}
        ]
    })))
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("SCMP_ACT_TRAP") && msg.contains("SCMP_ACT_ERRNO(1)"),
        "{msg}"
    );
    assert!(!msg.contains("SCMP_ACT_LOG"), "LOG lets it through: {msg}");
    // A seccomp rule in the default filter's list lets it through.
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["seccomp"], "action": "SCMP_ACT_TRAP"}
        ]
    }));
    let order: Vec<Action> = shape(&p).iter().map(|f| f.0).collect();
    assert_eq!(order, [Action::Allow, Action::Trap]);
}

// ---- conditions ----

fn arg(index: usize, value: u64, value_two: Option<u64>, op: &str) -> serde_json::Value {
    let mut v = json!({"index": index, "value": value, "op": op});
    if let Some(two) = value_two {
        v["valueTwo"] = json!(two);
    }
    v
}

fn matcher(args: Vec<serde_json::Value>) -> Result<Option<Match>, SeccompError> {
    let rule: oci_spec::runtime::LinuxSyscall = serde_json::from_value(json!({
        "names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": args
    }))
    .unwrap();
    rule_match(&rule)
}

#[test]
fn operators() {
    let cases = [
        ("SCMP_CMP_EQ", Op::Eq),
        ("SCMP_CMP_NE", Op::Ne),
        ("SCMP_CMP_LT", Op::Lt),
        ("SCMP_CMP_LE", Op::Le),
        ("SCMP_CMP_GT", Op::Gt),
        ("SCMP_CMP_GE", Op::Ge),
    ];
    for (name, op) in cases {
        let m = matcher(vec![arg(2, 7, Some(99), name)]).unwrap();
        let cond = Cond {
            index: 2,
            op,
            value: 7,
        };
        assert_eq!(m, Some(Match::AnyOf(vec![vec![cond]])), "{name}");
    }
    // MASKED_EQ: value is the mask, valueTwo the expected masked value (default 0).
    let masked = |mask, value| {
        Some(Match::AnyOf(vec![vec![Cond {
            index: 0,
            op: Op::MaskedEq(mask),
            value,
        }]]))
    };
    let m = matcher(vec![arg(0, 0xff00, Some(0x1200), "SCMP_CMP_MASKED_EQ")]).unwrap();
    assert_eq!(m, masked(0xff00, 0x1200));
    let m = matcher(vec![arg(0, 0xff00, None, "SCMP_CMP_MASKED_EQ")]).unwrap();
    assert_eq!(m, masked(0xff00, 0));
    // valueTwo outside the mask: can never match.
    let m = matcher(vec![arg(0, 0xff00, Some(0x1), "SCMP_CMP_MASKED_EQ")]).unwrap();
    assert_eq!(m, None);

    // Different arguments: one rule, AND-ed.
    let m = matcher(vec![
        arg(1, 5, None, "SCMP_CMP_EQ"),
        arg(0, 4, None, "SCMP_CMP_LT"),
    ]);
    let and = vec![
        Cond {
            index: 0,
            op: Op::Lt,
            value: 4,
        },
        Cond {
            index: 1,
            op: Op::Eq,
            value: 5,
        },
    ];
    assert_eq!(m.unwrap(), Some(Match::AnyOf(vec![and])));
    // Same argument twice: one rule per condition (OR), like runc; an impossible one drops.
    let m = matcher(vec![
        arg(0, 1, None, "SCMP_CMP_EQ"),
        arg(0, 2, None, "SCMP_CMP_EQ"),
        arg(0, 0xf, Some(0x10), "SCMP_CMP_MASKED_EQ"),
        arg(3, 9, None, "SCMP_CMP_NE"),
    ]);
    let one = |index, op, value| vec![Cond { index, op, value }];
    assert_eq!(
        m.unwrap(),
        Some(Match::AnyOf(vec![
            one(0, Op::Eq, 1),
            one(0, Op::Eq, 2),
            one(3, Op::Ne, 9)
        ]))
    );
    // No args, or an empty list: unconditional.
    assert_eq!(matcher(vec![]).unwrap(), Some(Match::Always));

    // Index out of range, naming the syscall.
    let err = matcher(vec![arg(6, 1, None, "SCMP_CMP_EQ")]).unwrap_err();
    assert!(matches!(
        err,
        SeccompError::ArgIndexOutOfRange { index: 6, .. }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("personality") && msg.contains("SCMP_CMP_EQ"),
        "{msg}"
    );
}

#[test]
fn three_valued_install_check() {
    let m = Match::AnyOf(vec![vec![
        Cond {
            index: 0,
            op: Op::Eq,
            value: 1,
        },
        Cond {
            index: 2,
            op: Op::Eq,
            value: 0,
        },
    ]]);
    let known = [Some(1), Some(0), None, None, None, None];
    assert_eq!(m.eval(&known), Tri::Maybe);
    assert_eq!(m.eval(&[Some(2), Some(0), None, None, None, None]), Tri::No);
    assert_eq!(
        m.eval(&[Some(1), Some(0), Some(0), None, None, None]),
        Tri::Yes
    );
    assert_eq!(Match::Always.eval(&known), Tri::Yes);
}

// ---- errors ----

fn compile_err(value: serde_json::Value) -> SeccompError {
    match decode_and_compile(value.to_string().as_bytes()) {
        Ok(p) => panic!("{value} compiled: {p:?}"),
        Err(e) => e,
    }
}

#[test]
fn errors() {
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
    assert!(matches!(e, SeccompError::NotifyUnsupported { .. }), "{e}");
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["ioctl"], "action": "SCMP_ACT_NOTIFY"}]}));
    assert!(e.to_string().contains("ioctl"), "{e}");
    assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "listenerPath": "/run/seccomp-agent.sock"}));
    assert!(matches!(e, SeccompError::ListenerPathUnsupported(_)), "{e}");

    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_BOGUS"}]}));
    assert!(matches!(e, SeccompError::Json(_)), "{e}");
    assert!(e.to_string().contains("SCMP_ACT_BOGUS"), "{e}");
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_BOGUS"}]}]}));
    assert!(matches!(e, SeccompError::Json(_)), "{e}");
    assert!(e.to_string().contains("SCMP_CMP_BOGUS"), "{e}");

    let e = compile_err(json!({"defaultAction": "SCMP_ACT_KILL", "defaultErrnoRet": 1}));
    assert!(matches!(e, SeccompError::ErrnoRetNotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("defaultAction"), "{e}");
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}]}));
    assert!(e.to_string().contains("read"), "{e}");
    assert!(e.to_string().contains("SCMP_ACT_ALLOW"), "{e}");
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 4096}]}));
    assert!(
        matches!(e, SeccompError::ErrnoRetOutOfRange { errno: 4096, .. }),
        "{e}"
    );
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_TRACE", "defaultErrnoRet": 65536}));
    assert!(matches!(e, SeccompError::ErrnoRetOutOfRange { .. }), "{e}");
    assert!(
        decode_and_compile(br#"{"defaultAction":"SCMP_ACT_TRACE","defaultErrnoRet":65535}"#)
            .is_ok()
    );

    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"]}));
    assert!(
        matches!(e, SeccompError::UnsupportedArchitectures(_)),
        "{e}"
    );
    assert!(decode_and_compile(
        br#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_NATIVE"]}"#
    )
    .is_ok());
    assert!(
        decode_and_compile(br#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":[]}"#).is_ok()
    );
}

#[test]
fn flags() {
    let p = program(json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": [
        "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}));
    assert_eq!(
        p.flags,
        libc::SECCOMP_FILTER_FLAG_LOG
            | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            | libc::SECCOMP_FILTER_FLAG_TSYNC
    );
    assert_eq!(program(json!({"defaultAction": "SCMP_ACT_ALLOW"})).flags, 0);
}

#[test]
fn too_large() {
    // Thousands of distinct conditional rules on one syscall do not fit in 4096
    // instructions.
    let rules: Vec<serde_json::Value> = (0..800)
        .map(|i| {
            json!({"names": ["getppid"], "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": i, "op": "SCMP_CMP_EQ"}]})
        })
        .collect();
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}));
    assert!(matches!(e, SeccompError::FilterTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("SCMP_ACT_ERRNO(1)"), "{e}");
    // Many small filters (one per errno value) hit the per-process total.
    let rules: Vec<serde_json::Value> = (1..=600)
        .map(|errno| json!({"names": allow_list(&[])[..60].to_vec(), "action": "SCMP_ACT_ERRNO", "errnoRet": errno}))
        .collect();
    let e = compile_err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}));
    assert!(matches!(e, SeccompError::TooManyInstructions { .. }), "{e}");
}

// ---- fuzz entry ----

/// xorshift64*: deterministic pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[test]
fn fuzz_entry_survives_garbage() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = [
        json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64"], "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["mkdir"], "action": "SCMP_ACT_KILL_PROCESS"}]})
        .to_string(),
        json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ERRNO",
              "args": [{"index": 0, "value": 2114060288u64, "op": "SCMP_CMP_MASKED_EQ"},
                       {"index": 0, "value": 1, "op": "SCMP_CMP_GT"}]}]})
        .to_string(),
    ];
    let alphabet = br#"{}[]:,"0123456789-eE.SCMP_ACT_ERRNOALLOWnamesargsindexvalueop "#;
    for round in 0..4000 {
        let seed = seeds[round % seeds.len()].as_bytes();
        let mut bytes = seed.to_vec();
        match round % 4 {
            // Pure random bytes.
            0 => {
                bytes = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            }
            // Truncation.
            1 => bytes.truncate(rng.below(seed.len() + 1)),
            // Byte mutations from a JSON-ish alphabet.
            _ => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(bytes.len());
                    bytes[i] = *rng.pick(alphabet);
                }
            }
        }
        let _ = decode_and_compile(&bytes);
    }
    for seed in &seeds {
        decode_and_compile(seed.as_bytes()).expect("seed compiles");
    }
}

// ---- filters checked by a BPF interpreter against a reference model ----

const AUDIT_ARCH_I386: u32 = 0x4000_0003;

/// Runs a classic BPF seccomp program on `seccomp_data`, checking every access.
fn run_bpf(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u32; 16];
    data[0] = nr;
    data[1] = arch;
    for (i, a) in args.iter().enumerate() {
        data[4 + 2 * i] = *a as u32;
        data[5 + 2 * i] = (*a >> 32) as u32;
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    for _ in 0..=prog.len() {
        let ins = prog.get(pc).expect("pc stays inside the program");
        let next = pc + 1;
        pc = match ins.code {
            BPF_LD_W_ABS => {
                assert!(ins.k % 4 == 0 && ins.k < 64, "load offset {}", ins.k);
                acc = data[ins.k as usize / 4];
                next
            }
            0x54 => {
                acc &= ins.k;
                next
            }
            0x05 => next + ins.k as usize,
            BPF_JMP_JEQ_K | BPF_JMP_JGT_K | BPF_JMP_JGE_K | 0x45 => {
                let taken = match ins.code {
                    BPF_JMP_JEQ_K => acc == ins.k,
                    BPF_JMP_JGT_K => acc > ins.k,
                    BPF_JMP_JGE_K => acc >= ins.k,
                    _ => acc & ins.k != 0,
                };
                next + usize::from(if taken { ins.jt } else { ins.jf })
            }
            BPF_RET_K => return ins.k,
            code => panic!("unexpected opcode {code:#x}"),
        };
    }
    panic!("no return");
}

/// What the kernel answers with all filters installed: lowest action wins, the newest on
/// ties.
fn kernel_answer(p: &SeccompProgram, nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let action_only = |ret: u32| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32;
    let mut ret = libc::SECCOMP_RET_ALLOW;
    for f in p.filters.iter().rev() {
        let cur = run_bpf(&f.bpf, nr, arch, args);
        if action_only(cur) < action_only(ret) {
            ret = cur;
        }
    }
    ret
}

/// The documented semantics, computed straight from the spec.
fn reference_answer(spec: &LinuxSeccomp, nr: u32, args: [u64; 6]) -> u32 {
    let value = |action: LinuxSeccompAction, errno: Option<u32>| match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            libc::SECCOMP_RET_KILL_THREAD
        }
        LinuxSeccompAction::ScmpActKillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => libc::SECCOMP_RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => libc::SECCOMP_RET_ERRNO | errno.unwrap_or(1),
        LinuxSeccompAction::ScmpActTrace => libc::SECCOMP_RET_TRACE | errno.unwrap_or(1),
        LinuxSeccompAction::ScmpActLog => libc::SECCOMP_RET_LOG,
        LinuxSeccompAction::ScmpActAllow => libc::SECCOMP_RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => unreachable!(),
    };
    let holds = |a: &LinuxSeccompArg| {
        let x = args[a.index()];
        let v = a.value();
        match a.op() {
            LinuxSeccompOperator::ScmpCmpEq => x == v,
            LinuxSeccompOperator::ScmpCmpNe => x != v,
            LinuxSeccompOperator::ScmpCmpLt => x < v,
            LinuxSeccompOperator::ScmpCmpLe => x <= v,
            LinuxSeccompOperator::ScmpCmpGt => x > v,
            LinuxSeccompOperator::ScmpCmpGe => x >= v,
            LinuxSeccompOperator::ScmpCmpMaskedEq => x & v == a.value_two().unwrap_or(0),
        }
    };
    let possible = |a: &LinuxSeccompArg| {
        a.op() != LinuxSeccompOperator::ScmpCmpMaskedEq
            || a.value_two().unwrap_or(0) & !a.value() == 0
    };
    let default = value(spec.default_action(), spec.default_errno_ret());
    let mut first_seen: HashMap<u32, usize> = HashMap::new();
    let mut matching = Vec::new();
    let mut max_named = None;
    for (i, rule) in spec.syscalls().iter().flatten().enumerate() {
        let act = value(rule.action(), rule.errno_ret());
        let nrs: Vec<i64> = rule
            .names()
            .iter()
            .filter_map(|n| syscall_number(n))
            .collect();
        max_named = nrs.iter().copied().chain(max_named).max();
        if act == default || nrs.is_empty() {
            continue;
        }
        let conds = rule.args().clone().unwrap_or_default();
        let mut indices: Vec<usize> = conds.iter().map(|a| a.index()).collect();
        indices.sort();
        let or_mode = indices.windows(2).any(|w| w[0] == w[1]);
        let (can, does) = if conds.is_empty() {
            (true, true)
        } else if or_mode {
            (
                conds.iter().any(possible),
                conds.iter().any(|a| possible(a) && holds(a)),
            )
        } else {
            (conds.iter().all(possible), conds.iter().all(holds))
        };
        if !can {
            continue;
        }
        first_seen.entry(act).or_insert(i);
        if does && nrs.contains(&i64::from(nr)) {
            matching.push(act);
        }
    }
    let restricts = default != libc::SECCOMP_RET_ALLOW
        || first_seen.keys().any(|&a| a != libc::SECCOMP_RET_ALLOW);
    if !restricts {
        return libc::SECCOMP_RET_ALLOW;
    }
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    if nr >= X32_SYSCALL_BIT {
        return enosys;
    }
    let action_only = |ret: u32| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32;
    if let Some(top) = matching.iter().map(|&a| action_only(a)).min() {
        return *matching
            .iter()
            .filter(|&&a| action_only(a) == top)
            .min_by_key(|&&a| first_seen[&a])
            .unwrap();
    }
    let permissive = default == libc::SECCOMP_RET_ALLOW
        || default == libc::SECCOMP_RET_LOG
        || default & libc::SECCOMP_RET_ACTION_FULL == libc::SECCOMP_RET_TRACE
        || default == enosys;
    match max_named {
        Some(max) if !permissive && i64::from(nr) > max => enosys,
        _ => default,
    }
}

#[test]
fn random_profiles_match_reference_semantics() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let names = [
        "read",
        "write",
        "getppid",
        "getpid",
        "mkdir",
        "openat",
        "uname",
        "getrandom",
        "personality",
        "bogus_name",
    ];
    let actions: [(&str, &[Option<u32>]); 8] = [
        ("SCMP_ACT_ALLOW", &[None]),
        ("SCMP_ACT_ERRNO", &[None, Some(1), Some(13), Some(38)]),
        ("SCMP_ACT_KILL", &[None]),
        ("SCMP_ACT_KILL_THREAD", &[None]),
        ("SCMP_ACT_KILL_PROCESS", &[None]),
        ("SCMP_ACT_TRAP", &[None]),
        ("SCMP_ACT_LOG", &[None]),
        ("SCMP_ACT_TRACE", &[None, Some(7)]),
    ];
    let ops = [
        "SCMP_CMP_EQ",
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_GT",
        "SCMP_CMP_GE",
        "SCMP_CMP_MASKED_EQ",
    ];
    let values: [u64; 9] = [
        0,
        1,
        2,
        0xff,
        0xffff_ffff,
        0x1_0000_0000,
        0x1_0000_00ff,
        u64::MAX - 1,
        u64::MAX,
    ];
    let mut probes: Vec<u32> = names
        .iter()
        .filter_map(|n| syscall_number(n))
        .map(|n| n as u32)
        .collect();
    probes.extend([
        nr("getcwd") as u32,
        nr("pidfd_open") as u32,
        X32_SYSCALL_BIT | nr("getpid") as u32,
        u32::MAX,
    ]);
    let mut checked = 0;
    for _ in 0..1500 {
        let action = |rng: &mut Rng| {
            let (name, errnos) = *rng.pick(&actions);
            (name, *rng.pick(errnos))
        };
        let (default, default_errno) = action(&mut rng);
        let mut v = json!({"defaultAction": default, "syscalls": []});
        if let Some(e) = default_errno {
            v["defaultErrnoRet"] = json!(e);
        }
        for _ in 0..rng.below(6) {
            let (act, errno) = action(&mut rng);
            let rule_names: Vec<&str> = (0..1 + rng.below(3)).map(|_| *rng.pick(&names)).collect();
            let args: Vec<serde_json::Value> = (0..rng.below(4))
                .map(|_| {
                    let mut a = json!({"index": rng.below(3), "value": *rng.pick(&values),
                                       "op": *rng.pick(&ops)});
                    if rng.below(2) == 0 {
                        a["valueTwo"] = json!(*rng.pick(&values));
                    }
                    a
                })
                .collect();
            let mut rule = json!({"names": rule_names, "action": act, "args": args});
            if let Some(e) = errno {
                rule["errnoRet"] = json!(e);
            }
            v["syscalls"].as_array_mut().unwrap().push(rule);
        }
        let s = spec(v.clone());
        let p = compile(&s).unwrap_or_else(|e| panic!("{v}: {e}"));
        for f in &p.filters {
            assert!(f.bpf.len() <= BPF_MAXINSNS);
            // Other architectures are killed by every filter.
            let ret = run_bpf(&f.bpf, 20, AUDIT_ARCH_I386, [0; 6]);
            assert_eq!(ret, libc::SECCOMP_RET_KILL_PROCESS);
        }
        for _ in 0..40 {
            let probe = *rng.pick(&probes);
            let mut args = [0u64; 6];
            for a in &mut args[..3] {
                let base = *rng.pick(&values);
                *a = match rng.below(3) {
                    0 => base.wrapping_sub(1),
                    1 => base.wrapping_add(1),
                    _ => base,
                };
            }
            let got = kernel_answer(&p, probe, AUDIT_ARCH_X86_64, args);
            let want = reference_answer(&s, probe, args);
            assert_eq!(
                got, want,
                "profile {v}\nsyscall {probe:#x} args {args:x?}\nfilters {p:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 1500 * 40);
}

// ---- real filters in a forked child ----

/// A raw syscall: `Ok(return value)` or `Err(errno)`. Allocates nothing.
fn sys(nr: libc::c_long, args: [u64; 6]) -> Result<i64, i32> {
    // SAFETY: the syscalls used by these tests take integers or pointers to live buffers.
    let ret = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    if ret == -1 {
        Err(nix::errno::Errno::last_raw())
    } else {
        Ok(ret)
    }
}

/// Forks; the child sets no_new_privs, installs `prog`, runs `body` and exits with what it
/// returns (0: pass, 100/101: set-up failed). The child allocates nothing.
fn in_child(prog: &SeccompProgram, body: impl FnOnce() -> i32) -> WaitStatus {
    // SAFETY: the child only makes raw syscalls (prctl, seccomp, the ones under test) and
    // _exit: nothing that needs the locks other threads of the test process may hold.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return 100;
                }
                if prog.install().is_err() {
                    return 101;
                }
                body()
            }))
            .unwrap_or(102);
            // SAFETY: _exit ends the child at once, without running anything of the parent.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

fn assert_passed(status: WaitStatus) {
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "child failed: {status:?} (exit code = number of the failed check)"
    );
}

fn killed_by_sigsys(status: WaitStatus) -> bool {
    matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _))
}

const ROOT: &std::ffi::CStr = c"/";

#[test]
fn kernel_errno_rule_with_default_allow() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "not_a_syscall"], "action": "SCMP_ACT_ERRNO"}]
    }));
    assert_eq!(p.filter_count(), 1);
    // Without the filter mkdir("/") is EEXIST.
    assert_eq!(
        sys(libc::SYS_mkdir, [ROOT.as_ptr() as u64, 0o755, 0, 0, 0, 0]),
        Err(libc::EEXIST)
    );
    let parent = std::process::id() as i64;
    assert_passed(in_child(&p, || {
        if sys(libc::SYS_mkdir, [ROOT.as_ptr() as u64, 0o755, 0, 0, 0, 0]) != Err(libc::EPERM) {
            return 1;
        }
        match sys(libc::SYS_getppid, [0; 6]) {
            Ok(ppid) if ppid == parent => {}
            _ => return 2,
        }
        if sys(libc::SYS_rmdir, [ROOT.as_ptr() as u64, 0, 0, 0, 0, 0]) == Err(libc::EPERM) {
            return 3;
        }
        // x32 syscall numbers never slip past the filter.
        let x32_getpid = libc::c_long::from(X32_SYSCALL_BIT as i32) | libc::SYS_getpid;
        if sys(x32_getpid, [0; 6]) != Err(libc::ENOSYS) {
            return 4;
        }
        0
    }));
}

#[test]
fn kernel_allow_list_with_default_enosys() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::ENOSYS,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": allow_list(&["getcwd"]), "action": "SCMP_ACT_ALLOW"}]
    }));
    assert_eq!(p.filter_count(), 1);
    assert_passed(in_child(&p, || {
        let mut buf = [0u8; 256];
        if sys(libc::SYS_getcwd, [buf.as_mut_ptr() as u64, 256, 0, 0, 0, 0]) != Err(libc::ENOSYS) {
            return 1;
        }
        if sys(libc::SYS_getpid, [0; 6]).is_err() {
            return 2;
        }
        if sys(libc::SYS_mkdir, [ROOT.as_ptr() as u64, 0o755, 0, 0, 0, 0]) != Err(libc::EEXIST) {
            return 3;
        }
        0
    }));
}

#[test]
fn kernel_default_eperm_and_enosys_stub() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["exit_group", "exit", "getpid", "seccomp"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EACCES}
        ]
    }));
    assert_eq!(p.filters[0].enosys_above, Some(libc::SYS_seccomp));
    assert_passed(in_child(&p, || {
        let mut buf = [0u8; 256];
        // Below the highest named syscall: the default action.
        if sys(libc::SYS_getcwd, [buf.as_mut_ptr() as u64, 256, 0, 0, 0, 0]) != Err(libc::EPERM) {
            return 1;
        }
        // Above it: ENOSYS.
        if sys(
            libc::SYS_getrandom,
            [buf.as_mut_ptr() as u64, 8, 0, 0, 0, 0],
        ) != Err(libc::ENOSYS)
        {
            return 2;
        }
        if sys(libc::SYS_getppid, [0; 6]) != Err(libc::EACCES) {
            return 3;
        }
        if sys(libc::SYS_getpid, [0; 6]).is_err() {
            return 4;
        }
        0
    }));
}

#[test]
fn kernel_argument_condition() {
    let mut names = allow_list(&["personality"]);
    names.retain(|n| n != "personality");
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0xffff_ffffu64, "op": "SCMP_CMP_EQ"}]}
        ]
    }));
    assert_passed(in_child(&p, || {
        // personality(0xffffffff) only queries.
        if sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]).is_err() {
            return 1;
        }
        // Any other persona: refused (ADDR_NO_RANDOMIZE would otherwise succeed).
        if sys(libc::SYS_personality, [0x0040000, 0, 0, 0, 0, 0]) != Err(libc::EPERM) {
            return 2;
        }
        // The full 64 bits are compared.
        if sys(libc::SYS_personality, [0x1_ffff_ffff, 0, 0, 0, 0, 0]) != Err(libc::EPERM) {
            return 3;
        }
        0
    }));
}

#[test]
fn kernel_operators() {
    // getppid & co. ignore their arguments, but the filter sees them.
    let rule = |name: &str, errno: i32, args: serde_json::Value| json!({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno, "args": args});
    let big = 0x1_0000_0005u64;
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            rule("getppid", 1, json!([arg(0, big, None, "SCMP_CMP_EQ")])),
            rule("getuid", 2, json!([arg(0, big, None, "SCMP_CMP_NE")])),
            rule("geteuid", 3, json!([arg(0, big, None, "SCMP_CMP_LT")])),
            rule("getgid", 4, json!([arg(0, big, None, "SCMP_CMP_LE")])),
            rule("getegid", 5, json!([arg(0, big, None, "SCMP_CMP_GT")])),
            rule("getpgrp", 6, json!([arg(0, big, None, "SCMP_CMP_GE")])),
            rule("getpid", 7, json!([arg(1, 0xf0_0000_00f0, Some(0x10_0000_0030), "SCMP_CMP_MASKED_EQ")])),
            // Same index twice: either value.
            rule("sched_yield", 8, json!([arg(2, 1, None, "SCMP_CMP_EQ"), arg(2, 2, None, "SCMP_CMP_EQ")])),
            // Different indexes: both.
            rule("gettid", 9, json!([arg(0, 1, None, "SCMP_CMP_EQ"), arg(1, 2, None, "SCMP_CMP_EQ")]))
        ]
    }));
    assert_eq!(p.filter_count(), 9);
    type Check = (libc::c_long, [u64; 3], Option<i32>);
    let checks: [Check; 27] = [
        (libc::SYS_getppid, [big, 0, 0], Some(1)),
        (libc::SYS_getppid, [5, 0, 0], None),
        (libc::SYS_getppid, [big + (1 << 32), 0, 0], None),
        (libc::SYS_getuid, [big, 0, 0], None),
        (libc::SYS_getuid, [5, 0, 0], Some(2)),
        (libc::SYS_geteuid, [big - 1, 0, 0], Some(3)),
        (libc::SYS_geteuid, [big, 0, 0], None),
        (libc::SYS_geteuid, [6, 0, 0], Some(3)),
        (libc::SYS_getgid, [big, 0, 0], Some(4)),
        (libc::SYS_getgid, [big + 1, 0, 0], None),
        (libc::SYS_getgid, [0xffff_ffff, 0, 0], Some(4)),
        (libc::SYS_getegid, [big + 1, 0, 0], Some(5)),
        (libc::SYS_getegid, [big, 0, 0], None),
        (libc::SYS_getegid, [1 << 33, 0, 0], Some(5)),
        (libc::SYS_getpgrp, [big, 0, 0], Some(6)),
        (libc::SYS_getpgrp, [big - 1, 0, 0], None),
        (libc::SYS_getpid, [0, 0x10_0000_0030, 0], Some(7)),
        (libc::SYS_getpid, [0, 0x1f_1234_5637, 0], Some(7)),
        (libc::SYS_getpid, [0, 0x10_0000_0020, 0], None),
        (libc::SYS_getpid, [0, 0x20_0000_0030, 0], None),
        (libc::SYS_sched_yield, [0, 0, 1], Some(8)),
        (libc::SYS_sched_yield, [0, 0, 2], Some(8)),
        (libc::SYS_sched_yield, [0, 0, 3], None),
        (libc::SYS_gettid, [1, 2, 0], Some(9)),
        (libc::SYS_gettid, [1, 3, 0], None),
        (libc::SYS_gettid, [0, 2, 0], None),
        (libc::SYS_getppid, [big, 0, 0], Some(1)),
    ];
    assert_passed(in_child(&p, || {
        for (i, (nr, a, errno)) in checks.iter().enumerate() {
            let got = sys(*nr, [a[0], a[1], a[2], 0, 0, 0]);
            let ok = match errno {
                Some(e) => got == Err(*e),
                None => got.is_ok(),
            };
            if !ok {
                return i as i32 + 1;
            }
        }
        0
    }));
}

#[test]
fn kernel_first_listed_errno_wins_ties() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EACCES},
            {"names": ["getppid", "getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOENT},
            // A matching ALLOW rule does not override a deny rule.
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
        ]
    }));
    assert_passed(in_child(&p, || {
        if sys(libc::SYS_getppid, [0; 6]) != Err(libc::EACCES) {
            return 1;
        }
        if sys(libc::SYS_getpid, [0; 6]) != Err(libc::ENOENT) {
            return 2;
        }
        0
    }));
}

#[test]
fn kernel_kill_process() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}]
    }));
    let status = in_child(&p, || {
        let _ = sys(libc::SYS_getppid, [0; 6]);
        1
    });
    assert!(killed_by_sigsys(status), "{status:?}");
    // Other syscalls still work.
    assert_passed(in_child(&p, || {
        i32::from(sys(libc::SYS_getpid, [0; 6]).is_err())
    }));
}

#[test]
fn kernel_kill_and_trap() {
    for action in ["SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP"] {
        let p = program(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid"], "action": action}]
        }));
        let status = in_child(&p, || {
            let _ = sys(libc::SYS_getppid, [0; 6]);
            1
        });
        assert!(killed_by_sigsys(status), "{action}: {status:?}");
    }
}

#[test]
fn kernel_default_kill_with_mixed_rules() {
    let mut names = allow_list(&["getcwd", "getppid"]);
    names.push("getcwd".into());
    let p = program(json!({
        "defaultAction": "SCMP_ACT_KILL_PROCESS",
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EROFS,
             "args": [{"index": 1, "value": 16, "op": "SCMP_CMP_LT"}]},
            {"names": ["kill"], "action": "SCMP_ACT_LOG"}
        ]
    }));
    assert_eq!(p.filter_count(), 3);
    let status = in_child(&p, || {
        let mut buf = [0u8; 256];
        // Allowed by the ALLOW rule.
        if sys(libc::SYS_getcwd, [buf.as_mut_ptr() as u64, 256, 0, 0, 0, 0]).is_err() {
            return 1;
        }
        // The ERRNO rule wins over the ALLOW rule when both match.
        if sys(libc::SYS_getcwd, [buf.as_mut_ptr() as u64, 8, 0, 0, 0, 0]) != Err(libc::EROFS) {
            return 2;
        }
        // LOG lets it run: kill(self, 0).
        let me = u64::from(std::process::id());
        if sys(libc::SYS_kill, [me, 0, 0, 0, 0, 0]).is_err() {
            return 3;
        }
        // Not listed: the default action kills.
        let _ = sys(libc::SYS_getppid, [0; 6]);
        4
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

#[test]
fn kernel_seccomp_restricted_by_one_filter() {
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                  "SECCOMP_FILTER_FLAG_TSYNC"],
        "syscalls": [
            {"names": ["seccomp"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EACCES},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["mkdir"], "action": "SCMP_ACT_TRAP"}
        ]
    }));
    assert_eq!(p.filter_count(), 3);
    let status = in_child(&p, || {
        let mut action = libc::SECCOMP_RET_ALLOW;
        let get_action_avail = 2; // SECCOMP_GET_ACTION_AVAIL
        let ptr = &mut action as *mut u32 as u64;
        if sys(libc::SYS_seccomp, [get_action_avail, 0, ptr, 0, 0, 0]) != Err(libc::EACCES) {
            return 1;
        }
        let _ = sys(libc::SYS_getppid, [0; 6]);
        2
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

#[test]
fn kernel_i386_syscalls_are_killed() {
    /// getpid through the 32-bit `int 0x80` entry (i386 number 20).
    fn int80_getpid() -> i64 {
        let mut eax: i64 = 20;
        // SAFETY: `int 0x80` with eax=20 is the i386 getpid; it reads no memory and
        // clobbers only rax (r8-r11 are saved by the kernel on this path).
        unsafe {
            std::arch::asm!("int 0x80", inout("rax") eax, options(nostack));
        }
        eax
    }
    let none = program(json!({"defaultAction": "SCMP_ACT_ALLOW"}));
    let works = in_child(&none, || i32::from(int80_getpid() <= 0));
    if !matches!(works, WaitStatus::Exited(_, 0)) {
        eprintln!("no IA-32 emulation here ({works:?}): skipped");
        return;
    }
    let p = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]
    }));
    let status = in_child(&p, || {
        int80_getpid();
        1
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}
