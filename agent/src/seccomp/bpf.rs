//! Classic BPF generation for a filter plan.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram, SeccompFilter, SeccompRule, TargetArch};

use super::compiler::Plan;
use super::rules::*;
use super::*;

// Classic BPF opcodes (linux/bpf_common.h).
// Classic BPF opcodes (linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS`.
pub(super) const BPF_LD_W_ABS: u16 = 0x20;
pub(super) const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
pub(super) const BPF_JMP_JGT_K: u16 = 0x05 | 0x20;
pub(super) const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
pub(super) const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
pub(super) const SECCOMP_DATA_NR: u32 = 0;
pub(super) const SECCOMP_DATA_ARCH: u32 = 4;

pub(super) fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

pub(super) fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// seccompiler's program with our prefix in place of its arch check.
pub(super) fn build_bpf(plan: &Plan) -> Result<BpfProgram, SeccompError> {
    let backend = |source| SeccompError::Backend {
        action: plan.describe(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (&nr, m) in &plan.syscalls {
        let chain = match m {
            Match::Always => Vec::new(),
            Match::AnyOf(conds) => conds
                .iter()
                .map(|rule| {
                    let conds = rule
                        .iter()
                        .map(|c| c.to_seccompiler())
                        .collect::<Result<Vec<_>, _>>()?;
                    SeccompRule::new(conds)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?,
        };
        rules.insert(nr, chain);
    }
    let filter = SeccompFilter::new(
        rules,
        plan.on_mismatch.to_seccompiler(),
        plan.on_match.to_seccompiler(),
        TargetArch::x86_64,
    )
    .map_err(backend)?;
    let program: BpfProgram = match filter.try_into() {
        Ok(program) => program,
        Err(seccompiler::BackendError::FilterTooLarge(len)) => {
            return Err(SeccompError::FilterTooLarge {
                action: plan.describe(),
                len,
                max: BPF_MAXINSNS,
            })
        }
        Err(e) => return Err(backend(e)),
    };

    // seccompiler starts with: load arch; arch == x86_64 ? skip 1 : next; return KILL_PROCESS.
    let arch_check = [
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    let Some(body) = program.strip_prefix(&arch_check[..]) else {
        return Err(SeccompError::UnexpectedProgram);
    };
    let enosys = Action::Errno(ENOSYS).ret();
    let mut bpf = Vec::with_capacity(program.len() + 5);
    bpf.extend_from_slice(&arch_check);
    bpf.extend_from_slice(&[
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, enosys),
    ]);
    if let Some(max) = plan.enosys_above {
        // Syscall numbers come from the table: 0 <= max < X32_SYSCALL_BIT.
        bpf.extend_from_slice(&[
            jump(BPF_JMP_JGT_K, max as u32, 0, 1),
            stmt(BPF_RET_K, enosys),
        ]);
    }
    // The body starts by loading the syscall number itself (or only returns).
    bpf.extend_from_slice(body);
    if bpf.len() > BPF_MAXINSNS {
        return Err(SeccompError::FilterTooLarge {
            action: plan.describe(),
            len: bpf.len(),
            max: BPF_MAXINSNS,
        });
    }
    Ok(bpf)
}
