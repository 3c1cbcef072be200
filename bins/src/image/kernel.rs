//! The guest kernel: a Debian kernel package fetched with `apt-get download`,
//! unpacked with `dpkg-deb -x` into a cache directory and reused from there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::modules::{self, ModuleNode, ModulesError};

/// The meta package whose dependency names the newest cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Why the kernel could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A command could not be started at all.
    #[error("cannot run {command}: {source}; is it installed (Debian's apt/dpkg)?")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {stderr}; {hint}")]
    Failed {
        /// The command line.
        command: String,
        /// Its error output.
        stderr: String,
        /// What to do.
        hint: String,
    },
    /// apt does not know how to find a cloud kernel.
    #[error(
        "no Debian cloud kernel package found: `apt-cache depends {META_PACKAGE}` names none; \
         run `apt-get update`, or pass --kernel-package (see `apt-cache search cloud-amd64`)"
    )]
    NoCloudKernel,
    /// The package unpacked but does not look like a kernel package.
    #[error("{package}: {what}; is it a linux-image-* package?")]
    NotAKernel {
        /// The package.
        package: String,
        /// What is missing.
        what: String,
    },
    /// File system trouble in the cache.
    #[error("kernel cache {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn run(cmd: &mut Command, hint: &str) -> Result<String, KernelError> {
    let line = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|source| KernelError::Spawn {
        command: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr
            .lines()
            .filter(|l| !l.starts_with("W: Download is performed unsandboxed"))
            .collect::<Vec<_>>()
            .join(" / ");
        return Err(KernelError::Failed {
            command: line,
            stderr: if stderr.is_empty() {
                out.status.to_string()
            } else {
                stderr
            },
            hint: hint.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package behind the cloud meta package (`apt-cache depends`).
pub fn default_package() -> Result<String, KernelError> {
    let out = run(
        Command::new("apt-cache").args(["depends", META_PACKAGE]),
        "run `apt-get update`, or pass --kernel-package",
    )
    .map_err(|_| KernelError::NoCloudKernel)?;
    pick_from_depends(&out).ok_or(KernelError::NoCloudKernel)
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output.
pub fn pick_from_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
}

/// The candidate version apt would download for `package`.
pub fn candidate_version(package: &str) -> Result<String, KernelError> {
    let hint = "is the package name right? `apt-cache search cloud-amd64`".to_string();
    let out = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
        &hint,
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| KernelError::Failed {
            command: format!("apt-cache show {package}"),
            stderr: "no Version field".into(),
            hint,
        })
}

/// A module lookup for [`modules::resolve`].
pub type Lookup<'a> = Box<dyn FnMut(&str) -> Result<Option<ModuleNode>, ModulesError> + 'a>;

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// The package name.
    pub package: String,
    /// Root of the unpacked package.
    pub root: PathBuf,
    /// Kernel release (`6.1.0-48-cloud-amd64`).
    pub kver: String,
    /// The compressed kernel image.
    pub vmlinuz: PathBuf,
}

/// Where `package` `version` is (or will be) unpacked under `cache`.
pub fn tree_dir(cache: &Path, package: &str, version: &str) -> PathBuf {
    cache.join(format!("{package}_{}", version.replace([':', '/'], "_")))
}

/// Downloads and unpacks the package unless the cache already has it.
/// `progress(step_text)` is called before the download and the unpacking.
pub fn fetch(
    cache: &Path,
    package: &str,
    version: &str,
    mut progress: impl FnMut(&str),
) -> Result<(KernelTree, bool), KernelError> {
    let dir = tree_dir(cache, package, version);
    if dir.is_dir() {
        progress(&format!(
            "using cached {package} {version} from {}",
            dir.display()
        ));
        return Ok((open(&dir, package)?, true));
    }
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    let work = cache.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    let result = (|| {
        progress(&format!(
            "downloading {package}={version} with apt-get download"
        ));
        let spec = format!("{package}={version}");
        run(
            Command::new("apt-get")
                .args(["download", "-q", &spec])
                .current_dir(&work),
            "is the package name right? `apt-cache search cloud-amd64`; \
             is the Debian mirror reachable (`apt-get update`)?",
        )?;
        let deb = std::fs::read_dir(&work)
            .map_err(io_err(&work))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| KernelError::Failed {
                command: format!("apt-get download {spec}"),
                stderr: "no .deb file was written".into(),
                hint: "check the apt configuration".into(),
            })?;
        progress(&format!("unpacking {} with dpkg-deb -x", deb.display()));
        let unpacked = work.join("root");
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
            "the downloaded package may be damaged; `apt-get clean` and retry",
        )?;
        open(&unpacked, package)?;
        std::fs::rename(&unpacked, &dir).map_err(io_err(&dir))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok((open(&dir, package)?, false))
}

/// Opens an unpacked kernel package.
pub fn open(root: &Path, package: &str) -> Result<KernelTree, KernelError> {
    let not = |what: String| KernelError::NotAKernel {
        package: package.into(),
        what,
    };
    let mods = root.join("lib/modules");
    let mut kvers: Vec<String> = std::fs::read_dir(&mods)
        .map_err(|e| not(format!("no lib/modules ({e})")))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kvers.sort();
    let kver = match kvers.as_slice() {
        [one] => one.clone(),
        [] => return Err(not("lib/modules/ is empty".into())),
        many => {
            return Err(not(format!(
                "several kernel versions in lib/modules/: {many:?}"
            )))
        }
    };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{kver}"));
    if !vmlinuz.is_file() {
        return Err(not(format!("no boot/vmlinuz-{kver}")));
    }
    Ok(KernelTree {
        package: package.into(),
        root: root.into(),
        kver,
        vmlinuz,
    })
}

impl KernelTree {
    /// `lib/modules/<kver>` of the package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.kver)
    }

    /// Names of the modules built into the kernel.
    pub fn builtin(&self) -> Result<BTreeSet<String>, KernelError> {
        let p = self.modules_dir().join("modules.builtin");
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(modules::parse_builtin(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(source) => Err(KernelError::Io { path: p, source }),
        }
    }

    /// A lookup for [`modules::resolve`]: `modules.dep` if the package has one,
    /// else a scan of the module files and their `.modinfo` sections.
    pub fn module_lookup(&self) -> Result<Lookup<'_>, KernelError> {
        let dir = self.modules_dir();
        let dep = dir.join("modules.dep");
        if let Ok(text) = std::fs::read_to_string(&dep) {
            let map = modules::parse_modules_dep(&text).map_err(|e| KernelError::NotAKernel {
                package: self.package.clone(),
                what: format!("{}: {e}", dep.display()),
            })?;
            return Ok(Box::new(move |name| Ok(map.get(name).cloned())));
        }
        let mut files = std::collections::BTreeMap::new();
        walk(&dir.join("kernel"), "kernel", &mut files).map_err(io_err(&dir))?;
        Ok(Box::new(move |name| {
            let Some(rel) = files.get(name) else {
                return Ok(None);
            };
            let bytes = read_module(&dir.join(rel)).map_err(|message| ModulesError::Read {
                module: name.into(),
                message,
            })?;
            let deps = super::elf::module_depends(&bytes)
                .map_err(|e| ModulesError::Read {
                    module: name.into(),
                    message: e.to_string(),
                })?
                .ok_or_else(|| ModulesError::Read {
                    module: name.into(),
                    message: "no .modinfo section".into(),
                })?;
            Ok(Some(ModuleNode {
                path: rel.clone(),
                deps,
            }))
        }))
    }
}

fn walk(
    dir: &Path,
    rel: &str,
    out: &mut std::collections::BTreeMap<String, String>,
) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let r = format!("{rel}/{name}");
        if e.file_type()?.is_dir() {
            walk(&e.path(), &r, out)?;
        } else if name.contains(".ko") {
            out.insert(modules::name_of(&r), r);
        }
    }
    Ok(())
}

/// The path a module gets in the image: compression suffix dropped.
pub fn uncompressed_name(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            return p.to_string();
        }
    }
    path.to_string()
}

/// A module file's bytes, decompressed (`.ko.xz`, `.ko.zst`, `.ko.gz`) with the
/// `xz`, `zstd` or `gzip` command.
pub fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let s = path.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        "xz"
    } else if s.ends_with(".zst") {
        "zstd"
    } else if s.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {tool} to decompress {}: {e}; install it",
                path.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -dc {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// The trailer a signed module ends with.
const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len,
/// 3 bytes of padding, then the signature's length (big-endian u32).
const SIG_INFO_LEN: usize = 12;

/// A module without its appended signature. The guest kernel checks a
/// signature it finds by hashing the whole module, which under TCG costs
/// more than loading it; Debian's kernel does not require signatures (no
/// `module.sig_enforce`, no lockdown in a VM without Secure Boot), and the
/// image itself comes from the host, so the guest's check proves nothing.
/// An unsigned module taints the guest kernel with `E` (informational).
/// Bytes without a well-formed signature trailer come back unchanged.
pub fn strip_signature(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(body) = bytes.len().checked_sub(SIG_MAGIC.len()) else {
        return bytes;
    };
    if &bytes[body..] != SIG_MAGIC || body < SIG_INFO_LEN {
        return bytes;
    }
    let info = &bytes[body - SIG_INFO_LEN..body];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let extra = info[3] as usize + info[4] as usize + sig_len;
    match (body - SIG_INFO_LEN).checked_sub(extra) {
        Some(end) => {
            bytes.truncate(end);
            bytes
        }
        None => bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_signature_is_stripped_and_anything_else_kept() {
        let module = b"\x7fELF module body".to_vec();
        let sig = vec![0xa5u8; 300];
        let mut signed = module.clone();
        signed.extend_from_slice(&sig);
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        signed.extend_from_slice(SIG_MAGIC);
        assert_eq!(strip_signature(signed.clone()), module);
        // no trailer, a short file, a length past the start: unchanged
        assert_eq!(strip_signature(module.clone()), module);
        assert_eq!(strip_signature(SIG_MAGIC.to_vec()), SIG_MAGIC.to_vec());
        let mut bad = signed[signed.len() - SIG_MAGIC.len() - SIG_INFO_LEN..].to_vec();
        bad[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(strip_signature(bad.clone()), bad);
    }

    #[test]
    fn depends_output() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n";
        assert_eq!(
            pick_from_depends(out).as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
        assert_eq!(pick_from_depends("x\n  Depends: <virtual>\n"), None);
        assert_eq!(uncompressed_name("kernel/a.ko.xz"), "kernel/a.ko");
        assert_eq!(uncompressed_name("kernel/a.ko"), "kernel/a.ko");
    }

    #[test]
    fn open_checks_the_layout() {
        let d = tempfile::tempdir().unwrap();
        assert!(open(d.path(), "p").is_err());
        std::fs::create_dir_all(d.path().join("lib/modules/6.1.0-x/kernel")).unwrap();
        std::fs::create_dir_all(d.path().join("boot")).unwrap();
        let e = open(d.path(), "p").unwrap_err().to_string();
        assert!(e.contains("vmlinuz-6.1.0-x"), "{e}");
        std::fs::write(d.path().join("boot/vmlinuz-6.1.0-x"), b"k").unwrap();
        let t = open(d.path(), "p").unwrap();
        assert_eq!(t.kver, "6.1.0-x");
    }
}
