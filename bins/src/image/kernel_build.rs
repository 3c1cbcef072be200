//! The kata-rs guest kernel: built from Debian's `linux-source` package (the
//! same 6.1 source as Debian's cloud kernel) with a configuration made of the
//! small, commented fragments in `bins/kernel-fragments/`, everything built
//! in (no modules), plus the patches in `bins/kernel-patches/`. The result
//! is laid out like an unpacked kernel package (`boot/vmlinuz-<kver>`,
//! `lib/modules/<kver>/modules.builtin`), so the image build takes it as it
//! takes Debian's, and is cached by source version, configuration and
//! patches hash.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::kernel::KernelTree;
use super::manifest;

/// The package name the image's manifest records for a built kernel.
pub const PACKAGE: &str = "kata-rs-kernel";

/// Appended to the kernel release (`6.1.192-kata-rs`).
pub const LOCALVERSION: &str = kata_proto::stdio::KERNEL_SUFFIX;

/// What the built tree holds (part of the cache key: a tree of another
/// layout is built again). 2: `vmlinuz` is the stripped ELF with the PVH
/// entry point, `bzImage` beside it.
const LAYOUT: &str = "layout 2";

/// The configuration fragments, in the order they are applied.
pub const FRAGMENTS: &[(&str, &str)] = &[
    (
        "base.conf",
        include_str!("../../kernel-fragments/base.conf"),
    ),
    ("x86.conf", include_str!("../../kernel-fragments/x86.conf")),
    (
        "acpi-pci.conf",
        include_str!("../../kernel-fragments/acpi-pci.conf"),
    ),
    (
        "hotplug.conf",
        include_str!("../../kernel-fragments/hotplug.conf"),
    ),
    (
        "virtio.conf",
        include_str!("../../kernel-fragments/virtio.conf"),
    ),
    (
        "vsock.conf",
        include_str!("../../kernel-fragments/vsock.conf"),
    ),
    ("fs.conf", include_str!("../../kernel-fragments/fs.conf")),
    (
        "namespaces.conf",
        include_str!("../../kernel-fragments/namespaces.conf"),
    ),
    (
        "security.conf",
        include_str!("../../kernel-fragments/security.conf"),
    ),
    (
        "network.conf",
        include_str!("../../kernel-fragments/network.conf"),
    ),
];

/// Patches applied to the source (`patch -p1`), in order: each explains
/// itself in its header.
pub const PATCHES: &[(&str, &str)] = &[
    (
        "lapic-timer-hz.patch",
        include_str!("../../kernel-patches/lapic-timer-hz.patch"),
    ),
    (
        "vsock-splice-pages.patch",
        include_str!("../../kernel-patches/vsock-splice-pages.patch"),
    ),
];

/// Why the kernel could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KernelBuildError {
    /// No kernel source on the machine.
    #[error(
        "no kernel source: /usr/src has no linux-source-*.tar.xz; install Debian's \
         linux-source package (`apt-get install linux-source`, `make deps` does)"
    )]
    NoSource,
    /// A command could not be started.
    #[error("cannot run {command}: {source}; install it (`make deps`: gcc, make, flex, bison, bc, libelf-dev)")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed ({status}); its last lines:\n{tail}")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// The end of its output.
        tail: String,
    },
    /// Options the fragments ask for that the configuration does not have.
    #[error(
        "the kernel configuration does not have what the fragments ask for (an option whose \
         dependencies are not met, or that this source does not know):\n  {}",
        .0.join("\n  ")
    )]
    Config(Vec<String>),
    /// No kernel is built for the current source and fragments.
    #[error(
        "no kata-rs kernel is built in {} for the current source and fragments; \
         build it with `kata-ctl image kernel`",
        .0.display()
    )]
    NotBuilt(PathBuf),
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelBuildError + '_ {
    move |source| KernelBuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The fragments as one Kconfig file (`KCONFIG_ALLCONFIG`).
pub fn fragments_text() -> String {
    joined(FRAGMENTS)
}

/// Named texts one after the other, each under a `# --- name` line.
fn joined(files: &[(&str, &str)]) -> String {
    files
        .iter()
        .map(|(name, text)| format!("# --- {name}\n{text}\n"))
        .collect()
}

/// What the fragments ask for: option → `y` or `n` (the last word wins).
pub fn wanted(fragments: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in fragments.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            m.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    m
}

/// The options of a `.config`: option → value (`n` for "is not set").
pub fn parse_config(config: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in config.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                m.insert(name.to_string(), "n".to_string());
            }
        } else if let Some((k, v)) = line.split_once('=') {
            m.insert(k.to_string(), v.to_string());
        }
    }
    m
}

/// Every option of `fragments` that `config` does not have as asked, as
/// `CONFIG_X: asked y, got not set`. Empty: the configuration is right.
pub fn check_config(fragments: &str, config: &str) -> Vec<String> {
    let have = parse_config(config);
    wanted(fragments)
        .into_iter()
        .filter_map(|(k, want)| {
            let got = have.get(&k).map(String::as_str).unwrap_or("n");
            (got != want).then(|| {
                let got = if got == "n" { "not set" } else { got };
                format!("{k}: asked {want}, got {got}")
            })
        })
        .collect()
}

/// Where kernel source tarballs are looked for instead of `/usr/src` (the
/// tests use it to build on a machine without one).
pub const SOURCE_DIR_ENV: &str = "KATA_KERNEL_SOURCE_DIR";

/// The newest kernel source tarball in `/usr/src` (or
/// [`SOURCE_DIR_ENV`]) and its package version.
pub fn find_source() -> Result<(PathBuf, String), KernelBuildError> {
    let dir = std::env::var_os(SOURCE_DIR_ENV).unwrap_or_else(|| "/usr/src".into());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| KernelBuildError::NoSource)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
        })
        .collect();
    found.sort();
    let tarball = found.pop().ok_or(KernelBuildError::NoSource)?;
    let package = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.xz"))
        .unwrap_or("linux-source")
        .to_string();
    // the package's version names the exact source (6.1.192-3)
    let version = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", &package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| package.trim_start_matches("linux-source-").to_string());
    Ok((tarball, version))
}

/// The cache directory of the kernel built from source `version` with the
/// current fragments.
pub fn built_dir(cache: &Path, version: &str) -> PathBuf {
    let key = format!("{LAYOUT}\n{}{}", fragments_text(), joined(PATCHES));
    let hash = manifest::hex(&Sha256::digest(key.as_bytes()));
    cache.join(format!(
        "{PACKAGE}_{}_{}",
        version.replace([':', '/'], "_"),
        &hash[..16]
    ))
}

/// The version string the image manifest records: source version and
/// configuration hash.
pub fn version_of(dir: &Path) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(&format!("{PACKAGE}_")))
        .unwrap_or_default()
        .to_string()
}

/// The built kernel's tree for source `version` and the current fragments,
/// if the cache has it.
fn built(cache: &Path, version: &str) -> Option<KernelTree> {
    super::kernel::open(&built_dir(cache, version), PACKAGE).ok()
}

/// The built kernel's tree if the cache has it for the current source and
/// fragments.
pub fn cached(cache: &Path) -> Option<KernelTree> {
    let (_, version) = find_source().ok()?;
    built(cache, &version)
}

/// Checks the configuration of the kernel built in `cache` against the
/// fragments: the configuration file and how many options it has as asked.
pub fn check_built(cache: &Path) -> Result<(PathBuf, usize), KernelBuildError> {
    let tree = cached(cache).ok_or_else(|| KernelBuildError::NotBuilt(cache.to_path_buf()))?;
    let config = tree.root.join("boot").join(format!("config-{}", tree.kver));
    let text = std::fs::read_to_string(&config).map_err(io_err(&config))?;
    let fragments = fragments_text();
    let missing = check_config(&fragments, &text);
    if !missing.is_empty() {
        return Err(KernelBuildError::Config(missing));
    }
    Ok((config, wanted(&fragments).len()))
}

/// Builds the kernel (or finds it in `cache`) with `jobs` parallel jobs;
/// returns its tree and whether it was cached. `progress` gets one line per
/// step and, while compiling, a line every few seconds.
pub fn build(
    cache: &Path,
    jobs: usize,
    mut progress: impl FnMut(&str),
) -> Result<(PathBuf, bool), KernelBuildError> {
    let (tarball, version) = find_source()?;
    if let Some(tree) = built(cache, &version) {
        return Ok((tree.root, true));
    }
    let dir = built_dir(cache, &version);
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    let work = cache.join(format!(".kernel-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    let result = build_in(&work, &tarball, &version, jobs, &mut progress).and_then(|tree| {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tree, &dir).map_err(io_err(&dir))
    });
    let _ = std::fs::remove_dir_all(&work);
    result?;
    // kernels of older sources or fragments are never used again
    for e in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        let p = e.path();
        let old = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&format!("{PACKAGE}_")));
        if old && p != dir {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    Ok((dir, false))
}

fn build_in(
    work: &Path,
    tarball: &Path,
    version: &str,
    jobs: usize,
    progress: &mut impl FnMut(&str),
) -> Result<PathBuf, KernelBuildError> {
    let t0 = Instant::now();
    progress(&format!("unpacking {} ({version})", tarball.display()));
    run(
        Command::new("tar")
            .arg("-xJf")
            .arg(tarball)
            .arg("-C")
            .arg(work)
            .arg("--strip-components=1"),
        &mut |_| {},
    )?;
    for (name, text) in PATCHES {
        progress(&format!("patching: {name}"));
        let file = work.join(name);
        std::fs::write(&file, text).map_err(io_err(&file))?;
        run(
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "-d"])
                .arg(work)
                .arg("-i")
                .arg(&file),
            &mut |_| {},
        )?;
    }
    let frag = work.join("kata-rs.config");
    let text = fragments_text();
    std::fs::write(&frag, &text).map_err(io_err(&frag))?;
    progress(&format!(
        "configuring: allnoconfig plus {} fragments",
        FRAGMENTS.len()
    ));
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(work)
            .arg(format!("LOCALVERSION={LOCALVERSION}"))
            .args(args)
            // reproducible: no host, user or time in the image
            .env("KBUILD_BUILD_USER", "kata-rs")
            .env("KBUILD_BUILD_HOST", "kata-rs")
            .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
            .env("KCONFIG_ALLCONFIG", &frag);
        c
    };
    run(&mut make(&["allnoconfig"]), &mut |_| {})?;
    let config_path = work.join(".config");
    let config = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let missing = check_config(&text, &config);
    if !missing.is_empty() {
        return Err(KernelBuildError::Config(missing));
    }
    progress(&format!("compiling with {jobs} jobs (several minutes)"));
    let mut compiled = 0usize;
    let mut last = Instant::now();
    let started = Instant::now();
    run(&mut make(&[&format!("-j{jobs}"), "bzImage"]), &mut |line| {
        if line.trim_start().starts_with("CC") {
            compiled += 1;
        }
        if last.elapsed() > Duration::from_secs(10) {
            last = Instant::now();
            progress(&format!(
                "compiling: {compiled} files in {:.0} s",
                started.elapsed().as_secs_f64()
            ));
        }
    })?;
    let out =
        make(&["-s", "kernelrelease"])
            .output()
            .map_err(|source| KernelBuildError::Spawn {
                command: "make".into(),
                source,
            })?;
    let kver = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let tree = work.join("tree");
    let boot = tree.join("boot");
    let mods = tree.join("lib/modules").join(&kver);
    for d in [&boot, &mods] {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let copy =
        |from: PathBuf, to: PathBuf| std::fs::copy(&from, &to).map(|_| ()).map_err(io_err(&from));
    // the kernel QEMU boots is the uncompressed ELF, stripped, entered
    // through its PVH note: no firmware loading and no decompression (about
    // 200 ms of every boot under TCG, docs/benchmarks.md); the bzImage stays
    // beside it for boot paths that need one
    run(
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(work.join("vmlinux"))
            .arg(boot.join(format!("vmlinuz-{kver}"))),
        &mut |_| {},
    )?;
    copy(
        work.join("arch/x86/boot/bzImage"),
        boot.join(format!("bzImage-{kver}")),
    )?;
    copy(config_path, boot.join(format!("config-{kver}")))?;
    let builtin = std::fs::read_to_string(work.join("modules.builtin")).unwrap_or_default();
    std::fs::write(mods.join("modules.builtin"), builtin).map_err(io_err(&mods))?;
    std::fs::write(mods.join("modules.dep"), "").map_err(io_err(&mods))?;
    progress(&format!(
        "built kernel {kver} in {:.0} s ({compiled} files compiled)",
        t0.elapsed().as_secs_f64()
    ));
    Ok(tree)
}

/// Runs `cmd`, giving each line of its output to `line`; on failure the
/// error carries the last lines.
fn run(cmd: &mut Command, line: &mut dyn FnMut(&str)) -> Result<(), KernelBuildError> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelBuildError::Spawn {
            command: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    let stderr = child.stderr.take();
    let errs = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = stderr {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                v.push(l);
            }
        }
        v
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(o) = child.stdout.take() {
        for l in BufReader::new(o).lines().map_while(Result::ok) {
            line(&l);
            tail.push(l);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|source| KernelBuildError::Spawn {
        command: command.clone(),
        source,
    })?;
    let errs = errs.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    tail.extend(
        errs.into_iter()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev(),
    );
    Err(KernelBuildError::Failed {
        command,
        status: status.to_string(),
        tail: tail.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_parse_and_ask_for_what_a_pod_needs() {
        let w = wanted(&fragments_text());
        for k in [
            "CONFIG_VIRTIO_FS",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_VIRTIO_NET",
            "CONFIG_SECCOMP_FILTER",
            "CONFIG_CGROUPS",
            "CONFIG_MEMORY_HOTPLUG",
            "CONFIG_HOTPLUG_CPU",
            "CONFIG_OVERLAY_FS",
            "CONFIG_PVH",
        ] {
            assert_eq!(w.get(k).map(String::as_str), Some("y"), "{k}");
        }
        assert_eq!(w.get("CONFIG_MODULES").map(String::as_str), Some("n"));
        for (name, text) in FRAGMENTS {
            assert!(text.starts_with("# "), "{name} starts with a comment");
        }
    }

    #[test]
    fn patches_explain_themselves_and_touch_the_source() {
        for (name, text) in PATCHES {
            let (header, diff) = text.split_once("\n--- a/").expect(name);
            assert!(header.trim().len() > 40, "{name}: a header saying why");
            assert!(
                diff.contains("\n+++ b/") && diff.contains("\n@@ "),
                "{name}"
            );
        }
    }

    #[test]
    fn the_check_names_what_did_not_take_effect() {
        let frag = "# x\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=n\nCONFIG_D=n\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n";
        assert_eq!(
            check_config(frag, config),
            vec![
                "CONFIG_B: asked y, got not set".to_string(),
                "CONFIG_C: asked n, got y".to_string()
            ]
        );
        assert!(check_config(frag, "CONFIG_A=y\nCONFIG_B=y\n").is_empty());
    }

    #[test]
    fn the_cache_key_follows_source_and_fragments() {
        let a = built_dir(Path::new("/c"), "6.1.192-3");
        let b = built_dir(Path::new("/c"), "6.1.193-1");
        assert_ne!(a, b);
        assert!(a.starts_with("/c"));
        assert!(
            version_of(&a).starts_with("6.1.192-3_"),
            "{}",
            version_of(&a)
        );
    }
}
