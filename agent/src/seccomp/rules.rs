//! The OCI profile's actions, argument conditions and per-syscall matches.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;

use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator};
use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};

use super::*;

/// A seccomp return action. The variant order is the kernel precedence, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Action {
    KillProcess,
    KillThread,
    Trap,
    Errno(u16),
    Trace(u16),
    Log,
    Allow,
}

impl Action {
    pub(super) fn to_seccompiler(self) -> SeccompAction {
        match self {
            Action::KillProcess => SeccompAction::KillProcess,
            Action::KillThread => SeccompAction::KillThread,
            Action::Trap => SeccompAction::Trap,
            Action::Errno(errno) => SeccompAction::Errno(u32::from(errno)),
            Action::Trace(msg) => SeccompAction::Trace(u32::from(msg)),
            Action::Log => SeccompAction::Log,
            Action::Allow => SeccompAction::Allow,
        }
    }

    /// The filter return value.
    pub(super) fn ret(self) -> u32 {
        u32::from(self.to_seccompiler())
    }

    /// Lets the syscall run (what a filter installed early must answer to later installs).
    pub(super) fn lets_through(self) -> bool {
        matches!(self, Action::Allow | Action::Log)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::KillProcess => f.write_str("SCMP_ACT_KILL_PROCESS"),
            Action::KillThread => f.write_str("SCMP_ACT_KILL_THREAD"),
            Action::Trap => f.write_str("SCMP_ACT_TRAP"),
            Action::Errno(errno) => write!(f, "SCMP_ACT_ERRNO({errno})"),
            Action::Trace(msg) => write!(f, "SCMP_ACT_TRACE({msg})"),
            Action::Log => f.write_str("SCMP_ACT_LOG"),
            Action::Allow => f.write_str("SCMP_ACT_ALLOW"),
        }
    }
}

/// Maps an OCI action and its optional errnoRet; `context` names where it comes from.
pub(super) fn convert_action(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    context: impl Fn() -> String,
) -> Result<Action, SeccompError> {
    let with_data = |max: u32, make: fn(u16) -> Action| match errno_ret {
        None => Ok(make(DEFAULT_ERRNO)),
        Some(errno) => match u16::try_from(errno) {
            Ok(data) if errno <= max => Ok(make(data)),
            _ => Err(SeccompError::ErrnoRetOutOfRange {
                context: context(),
                action: action.to_string(),
                errno,
                max,
            }),
        },
    };
    let plain = |converted: Action| match errno_ret {
        None => Ok(converted),
        Some(errno) => Err(SeccompError::ErrnoRetNotAllowed {
            context: context(),
            action: action.to_string(),
            errno,
        }),
    };
    match action {
        LinuxSeccompAction::ScmpActErrno => with_data(MAX_ERRNO, Action::Errno),
        LinuxSeccompAction::ScmpActTrace => with_data(u32::from(u16::MAX), Action::Trace),
        LinuxSeccompAction::ScmpActAllow => plain(Action::Allow),
        LinuxSeccompAction::ScmpActLog => plain(Action::Log),
        LinuxSeccompAction::ScmpActTrap => plain(Action::Trap),
        // libseccomp's SCMP_ACT_KILL is SCMP_ACT_KILL_THREAD.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            plain(Action::KillThread)
        }
        LinuxSeccompAction::ScmpActKillProcess => plain(Action::KillProcess),
        LinuxSeccompAction::ScmpActNotify => {
            Err(SeccompError::NotifyUnsupported { context: context() })
        }
    }
}

/// A comparison operator; `MaskedEq` carries the mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    MaskedEq(u64),
}

/// One argument condition: `args[index] <op> value` (for `MaskedEq`: `args[index] & mask ==
/// value`), on the full 64 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Cond {
    pub(super) index: u8,
    pub(super) op: Op,
    pub(super) value: u64,
}

impl Cond {
    /// `Ok(None)` for a condition that can never hold (masked value with bits outside the mask).
    pub(super) fn from_oci(
        arg: &LinuxSeccompArg,
        syscall: &str,
    ) -> Result<Option<Cond>, SeccompError> {
        let index = match u8::try_from(arg.index()) {
            Ok(index) if arg.index() <= MAX_ARG_INDEX => index,
            _ => {
                return Err(SeccompError::ArgIndexOutOfRange {
                    syscall: syscall.to_owned(),
                    index: arg.index(),
                    op: arg.op().to_string(),
                })
            }
        };
        let (op, value) = match arg.op() {
            LinuxSeccompOperator::ScmpCmpEq => (Op::Eq, arg.value()),
            LinuxSeccompOperator::ScmpCmpNe => (Op::Ne, arg.value()),
            LinuxSeccompOperator::ScmpCmpLt => (Op::Lt, arg.value()),
            LinuxSeccompOperator::ScmpCmpLe => (Op::Le, arg.value()),
            LinuxSeccompOperator::ScmpCmpGt => (Op::Gt, arg.value()),
            LinuxSeccompOperator::ScmpCmpGe => (Op::Ge, arg.value()),
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                let mask = arg.value();
                let value = arg.value_two().unwrap_or(0);
                if value & !mask != 0 {
                    return Ok(None);
                }
                (Op::MaskedEq(mask), value)
            }
        };
        Ok(Some(Cond { index, op, value }))
    }

    pub(super) fn holds(&self, arg: u64) -> bool {
        match self.op {
            Op::Eq => arg == self.value,
            Op::Ne => arg != self.value,
            Op::Lt => arg < self.value,
            Op::Le => arg <= self.value,
            Op::Gt => arg > self.value,
            Op::Ge => arg >= self.value,
            Op::MaskedEq(mask) => arg & mask == self.value,
        }
    }

    pub(super) fn to_seccompiler(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let op = match self.op {
            Op::Eq => SeccompCmpOp::Eq,
            Op::Ne => SeccompCmpOp::Ne,
            Op::Lt => SeccompCmpOp::Lt,
            Op::Le => SeccompCmpOp::Le,
            Op::Gt => SeccompCmpOp::Gt,
            Op::Ge => SeccompCmpOp::Ge,
            Op::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
        };
        SeccompCondition::new(self.index, SeccompCmpArgLen::Qword, op, self.value)
    }
}

/// When a syscall matches within one filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Match {
    /// Whatever the arguments.
    Always,
    /// When all conditions of at least one of the (non-empty) rules hold.
    AnyOf(Vec<Vec<Cond>>),
}

impl Match {
    pub(super) fn merge(&mut self, other: &Match) {
        match (&mut *self, other) {
            (Match::Always, _) => {}
            (_, Match::Always) => *self = Match::Always,
            (Match::AnyOf(mine), Match::AnyOf(theirs)) => {
                for rule in theirs {
                    if !mine.contains(rule) {
                        mine.push(rule.clone());
                    }
                }
            }
        }
    }

    /// Three-valued evaluation when only some arguments are known.
    pub(super) fn eval(&self, args: &[Option<u64>; 6]) -> Tri {
        let Match::AnyOf(rules) = self else {
            return Tri::Yes;
        };
        let mut any = Tri::No;
        for rule in rules {
            let mut all = Tri::Yes;
            for cond in rule {
                match args[usize::from(cond.index)] {
                    Some(arg) if !cond.holds(arg) => all = Tri::No,
                    Some(_) => {}
                    None if all == Tri::Yes => all = Tri::Maybe,
                    None => {}
                }
            }
            any = match (any, all) {
                (Tri::Yes, _) | (_, Tri::Yes) => Tri::Yes,
                (Tri::Maybe, _) | (_, Tri::Maybe) => Tri::Maybe,
                _ => Tri::No,
            };
        }
        any
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tri {
    No,
    Maybe,
    Yes,
}

/// The conditions of one OCI rule; `None` if it can never match.
pub(super) fn rule_match(
    rule: &oci_spec::runtime::LinuxSyscall,
) -> Result<Option<Match>, SeccompError> {
    let args = match rule.args() {
        Some(args) if !args.is_empty() => args,
        _ => return Ok(Some(Match::Always)),
    };
    let syscall = rule.names().first().map(String::as_str).unwrap_or("");
    let mut conds = Vec::with_capacity(args.len());
    let mut per_index = [0usize; MAX_ARG_INDEX + 1];
    for arg in args {
        let cond = Cond::from_oci(arg, syscall)?;
        // from_oci checked the index.
        per_index[arg.index()] += 1;
        conds.push(cond);
    }
    if per_index.iter().any(|&n| n > 1) {
        // runc: with two conditions on the same argument, each condition is a rule of its own.
        let rules: Vec<Vec<Cond>> = conds.into_iter().flatten().map(|c| vec![c]).collect();
        return Ok((!rules.is_empty()).then_some(Match::AnyOf(rules)));
    }
    let rule: Option<Vec<Cond>> = conds.into_iter().collect();
    Ok(rule.map(|mut rule| {
        rule.sort();
        Match::AnyOf(vec![rule])
    }))
}

/// The syscalls of one rule action.
pub(super) struct Group {
    /// Position in the profile of its first rule.
    pub(super) first: usize,
    pub(super) syscalls: BTreeMap<i64, Match>,
}

pub(super) fn merge_into(map: &mut BTreeMap<i64, Match>, nr: i64, m: &Match) {
    match map.entry(nr) {
        Entry::Vacant(entry) => {
            entry.insert(m.clone());
        }
        Entry::Occupied(mut entry) => entry.get_mut().merge(m),
    }
}
