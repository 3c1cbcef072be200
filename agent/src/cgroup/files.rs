//! Reading, writing and parsing cgroup files.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use kata_proto::agent::{BlkioStats, BlkioStatsEntry};

use super::CgroupError;

pub(super) fn read_string(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `None` when the file does not exist.
pub(super) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(super) fn parse_u64_at(path: &Path, text: &str) -> Result<u64, CgroupError> {
    let t = text.trim();
    t.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("{t:?} is not an unsigned integer"),
    })
}

pub(super) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    parse_u64_at(path, &read_string(path)?)
}

pub(super) fn read_u64_opt(path: &Path) -> Result<Option<u64>, CgroupError> {
    read_opt(path)?.map(|t| parse_u64_at(path, &t)).transpose()
}

/// A limit file: `max` → `None`.
pub(super) fn read_limit_opt(path: &Path) -> Result<Option<Option<u64>>, CgroupError> {
    read_opt(path)?
        .map(|t| match t.trim() {
            "max" => Ok(None),
            _ => parse_u64_at(path, &t).map(Some),
        })
        .transpose()
}

pub(super) fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// `key value` lines (memory.stat, cpu.stat, memory.events, cpuacct.stat);
/// lines whose value is not an unsigned integer are left out.
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            it.next().is_none().then(|| (k.to_string(), v))
        })
        .collect()
}

pub(super) fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// v2 `io.stat` (`8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`) as
/// blkio statistics: bytes and operations, `Read` and `Write` per device.
pub fn parse_io_stat(text: &str) -> BlkioStats {
    let mut out = BlkioStats::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some((major, minor)) = it.next().and_then(parse_dev) else {
            continue;
        };
        let fields: HashMap<&str, u64> = it
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        let entry = |op: &str, key: &str| {
            fields.get(key).map(|&value| BlkioStatsEntry {
                major,
                minor,
                op: op.to_string(),
                value,
            })
        };
        out.io_service_bytes_recursive.extend(
            [entry("Read", "rbytes"), entry("Write", "wbytes")]
                .into_iter()
                .flatten(),
        );
        out.io_serviced_recursive.extend(
            [entry("Read", "rios"), entry("Write", "wios")]
                .into_iter()
                .flatten(),
        );
    }
    out
}

/// v1 blkio statistics (`8:0 Read 4096` lines; the closing `Total N` line is
/// left out).
pub fn parse_blkio_v1(text: &str) -> Vec<BlkioStatsEntry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (major, minor) = parse_dev(it.next()?)?;
            let op = it.next()?.to_string();
            let value = it.next()?.parse().ok()?;
            Some(BlkioStatsEntry {
                major,
                minor,
                op,
                value,
            })
        })
        .collect()
}

pub(super) fn parse_u64_list(text: &str) -> Vec<u64> {
    text.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// `cgroup.procs` content.
pub(super) fn parse_pids(path: &Path, text: &str) -> Result<Vec<i32>, CgroupError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse().map_err(|_| CgroupError::Parse {
                path: path.to_path_buf(),
                reason: format!("{l:?} is not a process id"),
            })
        })
        .collect()
}

/// Adds the processes of `dir` and of its descendant cgroups to `out`. A
/// directory that vanishes meanwhile is skipped.
pub(super) fn procs_in_tree(dir: &Path, out: &mut BTreeSet<i32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let Some(text) = read_opt(&procs)? else {
        return Ok(());
    };
    out.extend(parse_pids(&procs, &text)?);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            procs_in_tree(&e.path(), out)?;
        }
    }
    Ok(())
}

/// Removes a cgroup directory and its child cgroups, deepest first, retrying
/// while the kernel still reports it busy (as runc does).
pub(super) fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let mut delay = Duration::from_millis(10);
    for attempt in 0.. {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 5 => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// v1 cpuset: a new cgroup starts with empty `cpuset.cpus`/`cpuset.mems`, and
/// no process can join it until they are set. Copies the parent's.
pub(super) fn init_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        if read_string(&dir.join(f))?.trim().is_empty() {
            let v = read_string(&parent.join(f))?;
            write_value(&dir.join(f), v.trim())?;
        }
    }
    Ok(())
}
