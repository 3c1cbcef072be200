//! Compiling a profile: one filter plan per action group, in precedence order.

use std::collections::BTreeMap;

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompFilterFlag};

use super::bpf::build_bpf;
use super::rules::*;
use super::*;

/// A filter before BPF generation.
pub(super) struct Plan {
    pub(super) on_match: Action,
    pub(super) on_mismatch: Action,
    pub(super) syscalls: BTreeMap<i64, Match>,
    pub(super) enosys_above: Option<i64>,
    /// Install order among non-blocking filters: higher first (default filter: `usize::MAX`).
    pub(super) rank: usize,
}

impl Plan {
    /// Whether this filter could refuse the seccomp(2) calls installing the filters after it.
    pub(super) fn may_refuse_install(&self, flags: libc::c_ulong) -> bool {
        let nr = libc::SYS_seccomp;
        if self.enosys_above.is_some_and(|max| nr > max) {
            return true;
        }
        let args = [
            Some(u64::from(libc::SECCOMP_SET_MODE_FILTER)),
            Some(flags),
            None,
            None,
            None,
            None,
        ];
        match self.syscalls.get(&nr).map_or(Tri::No, |m| m.eval(&args)) {
            Tri::Yes => !self.on_match.lets_through(),
            Tri::No => !self.on_mismatch.lets_through(),
            Tri::Maybe => !(self.on_match.lets_through() && self.on_mismatch.lets_through()),
        }
    }

    pub(super) fn describe(&self) -> String {
        if self.on_match == Action::Allow {
            format!("default {}", self.on_mismatch)
        } else {
            self.on_match.to_string()
        }
    }
}

/// Compiles an OCI seccomp profile into filters for the native x86_64.
pub fn compile(spec: &LinuxSeccomp) -> Result<SeccompProgram, SeccompError> {
    if !cfg!(target_arch = "x86_64") || table::SYSCALL_TABLE.is_empty() {
        return Err(SeccompError::UnsupportedTarget);
    }
    if let Some(path) = spec.listener_path() {
        return Err(SeccompError::ListenerPathUnsupported(path.clone()));
    }
    check_architectures(spec.architectures().as_deref())?;
    let flags = convert_flags(spec.flags().as_deref());
    let default = convert_action(spec.default_action(), spec.default_errno_ret(), || {
        "defaultAction".to_owned()
    })?;

    let mut groups: BTreeMap<Action, Group> = BTreeMap::new();
    // Highest syscall number named by the profile, for the ENOSYS stub.
    let mut max_named: Option<i64> = None;
    let mut numbers = Vec::new();
    for (position, rule) in spec.syscalls().iter().flatten().enumerate() {
        let action = convert_action(rule.action(), rule.errno_ret(), || {
            format!("syscalls {:?}", rule.names())
        })?;
        let matcher = rule_match(rule)?;
        numbers.clear();
        for name in rule.names() {
            match syscall_number(name) {
                Some(nr) => numbers.push(nr),
                None => tracing::debug!(syscall = %name, "seccomp: unknown syscall skipped"),
            }
        }
        max_named = numbers.iter().copied().chain(max_named).max();
        if action == default {
            tracing::debug!(names = ?rule.names(), %action, "seccomp: rule with the default action skipped");
            continue;
        }
        let Some(matcher) = matcher else {
            tracing::debug!(names = ?rule.names(), "seccomp: rule that can never match skipped");
            continue;
        };
        if numbers.is_empty() {
            continue;
        }
        let group = groups.entry(action).or_insert_with(|| Group {
            first: position,
            syscalls: BTreeMap::new(),
        });
        for &nr in &numbers {
            merge_into(&mut group.syscalls, nr, &matcher);
        }
    }

    let mut plans = Vec::new();
    if default != Action::Allow {
        let mut named = BTreeMap::new();
        for group in groups.values() {
            for (&nr, m) in &group.syscalls {
                merge_into(&mut named, nr, m);
            }
        }
        let permissive =
            matches!(default, Action::Log | Action::Trace(_)) || default == Action::Errno(ENOSYS);
        plans.push(Plan {
            on_match: Action::Allow,
            on_mismatch: default,
            syscalls: named,
            enosys_above: if permissive { None } else { max_named },
            rank: usize::MAX,
        });
    }
    for (action, group) in groups {
        if action != Action::Allow {
            plans.push(Plan {
                on_match: action,
                on_mismatch: Action::Allow,
                syscalls: group.syscalls,
                enosys_above: None,
                rank: group.first,
            });
        }
    }

    // Install order: filters that let the later seccomp(2) calls through first, by decreasing
    // rank (so the first-listed action is installed last and wins ties), then the one that may
    // refuse them.
    let mut keyed: Vec<(bool, Plan)> = plans
        .into_iter()
        .map(|plan| (plan.may_refuse_install(flags), plan))
        .collect();
    keyed.sort_by(|(a_refuses, a), (b_refuses, b)| {
        a_refuses.cmp(b_refuses).then_with(|| b.rank.cmp(&a.rank))
    });
    let refusing: Vec<String> = keyed
        .iter()
        .filter(|(refuses, _)| *refuses)
        .map(|(_, plan)| plan.describe())
        .collect();
    if refusing.len() > 1 {
        return Err(SeccompError::SeccompSyscallRestricted {
            actions: refusing.join(", "),
        });
    }

    let mut filters = Vec::with_capacity(keyed.len());
    let mut total = 0;
    for (_, plan) in keyed {
        let bpf = build_bpf(&plan)?;
        total += bpf.len() + 4;
        filters.push(Filter {
            on_match: plan.on_match,
            on_mismatch: plan.on_mismatch,
            syscalls: plan.syscalls,
            enosys_above: plan.enosys_above,
            bpf,
        });
    }
    if total > MAX_INSNS_PER_PATH {
        return Err(SeccompError::TooManyInstructions {
            total,
            max: MAX_INSNS_PER_PATH,
        });
    }
    Ok(SeccompProgram { filters, flags })
}

pub(super) fn check_architectures(archs: Option<&[Arch]>) -> Result<(), SeccompError> {
    let Some(archs) = archs.filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    if !archs
        .iter()
        .any(|a| matches!(a, Arch::ScmpArchX86_64 | Arch::ScmpArchNative))
    {
        return Err(SeccompError::UnsupportedArchitectures(archs.to_vec()));
    }
    for arch in archs {
        if !matches!(arch, Arch::ScmpArchX86_64 | Arch::ScmpArchNative) {
            tracing::debug!(%arch, "seccomp: architecture ignored, only x86_64 is filtered");
        }
    }
    Ok(())
}

pub(super) fn convert_flags(flags: Option<&[LinuxSeccompFilterFlag]>) -> libc::c_ulong {
    let mut bits = 0;
    for flag in flags.unwrap_or_default() {
        bits |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                tracing::debug!(%flag, "seccomp: flag ignored (only meaningful with SCMP_ACT_NOTIFY)");
                0
            }
        };
    }
    bits
}
