//! `kata-ctl image build`: the guest kernel and initramfs.
//!
//! Output directory layout: `vmlinuz` (the Debian cloud kernel as shipped),
//! `initrd.img` (an uncompressed cpio newc archive, see [`cpio`]) and
//! `manifest.json` (see [`manifest`]). The initramfs holds the agent as `/init`,
//! a static busybox with applet links under `/bin` (debug console), the kernel
//! modules the guest needs under `/lib/modules/<kver>/` with their load order in
//! `/etc/kata-modules`, and any `--extra` binaries under `/usr/bin`.

pub mod cpio;
pub mod elf;
pub mod kernel;
pub mod kernel_build;
pub mod manifest;
pub mod modules;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use manifest::{Checksums, Extra, Inputs, Manifest, ManifestError};

/// Default cache of downloaded and unpacked kernel packages.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kata-rs/image";

/// Default busybox (Debian's `busybox-static`).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// File listing the modules to load, in the initramfs.
pub const MODULES_LIST: &str = "etc/kata-modules";

/// Busybox applets linked under `/bin` (those this busybox has).
const APPLETS: &[&str] = &[
    "sh", "ash", "awk", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "dmesg", "du",
    "echo", "env", "false", "find", "free", "grep", "halt", "head", "hostname", "id", "ifconfig",
    "insmod", "ip", "kill", "less", "ln", "ls", "lsmod", "mkdir", "mknod", "more", "mount", "mv",
    "nc", "netstat", "ping", "poweroff", "ps", "readlink", "reboot", "rm", "rmdir", "route", "sed",
    "sleep", "sort", "stat", "sync", "tail", "tee", "top", "touch", "tr", "true", "umount",
    "uname", "vi", "wc", "which", "xargs",
];

/// Why the image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Kernel package trouble.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// Module set trouble.
    #[error(transparent)]
    Modules(#[from] modules::ModulesError),
    /// Archive trouble.
    #[error(transparent)]
    Cpio(#[from] cpio::CpioError),
    /// Manifest trouble.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A binary to put in the image is missing or unusable.
    #[error("{what} {path}: {message}")]
    Binary {
        /// Which role (agent, busybox, extra).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// File system trouble with the output.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The policy does not parse (it would lock the guest: the agent refuses
    /// everything with a broken default policy).
    #[error("--policy {path}: {message}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// Two extras with one name.
    #[error("two --extra files are both named {0}; they would both be /usr/bin/{0}")]
    DuplicateExtra(String),
    /// `--kernel kata-rs` without a built kernel.
    #[error(
        "--kernel kata-rs: kata-rs's guest kernel is not built for the current source and \
         fragments; build it with `kata-ctl image kernel`, or use --kernel debian"
    )]
    KernelNotBuilt,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory.
    pub output: PathBuf,
    /// The agent binary; `None`: `kata-agent` next to this executable.
    pub agent: Option<PathBuf>,
    /// The busybox binary.
    pub busybox: PathBuf,
    /// Kernel package; `None`: the one the cloud meta package depends on.
    /// Used when the kernel is Debian's.
    pub kernel_package: Option<String>,
    /// Which kernel the image gets.
    pub kernel: KernelChoice,
    /// Extra static binaries for `/usr/bin`.
    pub extras: Vec<PathBuf>,
    /// Cache of unpacked kernel packages.
    pub cache_dir: PathBuf,
    /// The agent policy to put at [`POLICY_PATH`] (Kata's AGENT_POLICY=yes;
    /// the agent must be built with the agent-policy feature to use it).
    pub policy: Option<PathBuf>,
}

/// Which guest kernel an image gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// kata-rs's own kernel (`kata-ctl image kernel` builds it; an error
    /// if it is not built).
    KataRs,
    /// Debian's cloud kernel package.
    Debian,
    /// kata-rs's kernel if it is built, else Debian's (saying so).
    Auto,
}

/// Where the guest's agent reads its default policy (Kata's path), in the
/// initramfs.
pub const POLICY_PATH: &str = "etc/kata-opa/default-policy.rego";

/// What a build did.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The manifest of the output.
    pub manifest: Manifest,
    /// Nothing was rebuilt.
    pub up_to_date: bool,
}

const STEPS: usize = 6;

fn step(n: usize, text: &str) {
    eprintln!("[{n}/{STEPS}] {text}");
}

/// The default agent: `kata-agent` next to the running executable.
pub fn default_agent() -> Result<PathBuf, ImageError> {
    let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
    Ok(exe.with_file_name("kata-agent"))
}

/// Checks that `path` is a static x86-64 executable and returns its checksum.
pub fn check_static(what: &'static str, path: &Path, hint: &str) -> Result<String, ImageError> {
    let bad = |message: String| ImageError::Binary {
        what,
        path: path.into(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("{e}; {hint}")))?;
    let info = elf::inspect_executable(&bytes).map_err(|e| bad(format!("{e}; {hint}")))?;
    if !info.is_x86_64 {
        return Err(bad("not an x86-64 executable".into()));
    }
    if let Some(interp) = info.interpreter {
        return Err(bad(format!(
            "is dynamically linked (interpreter {interp}) but the guest has no libraries; {hint}"
        )));
    }
    Ok(manifest::hex(&Sha256::digest(&bytes)))
}

const AGENT_HINT: &str = "build it with `cargo build -p kata-agent` in the kata-rs workspace \
    (its .cargo/config.toml links statically with crt-static), or pass --agent";
const BUSYBOX_HINT: &str = "install Debian's busybox-static (`apt-get install busybox-static`) \
    or pass --busybox";
const EXTRA_HINT: &str = "extras must be static binaries (build with crt-static)";

/// Builds the image (or finds it up to date).
pub fn build(opts: &BuildOptions) -> Result<BuildReport, ImageError> {
    let started = Instant::now();
    let agent = match &opts.agent {
        Some(p) => p.clone(),
        None => default_agent()?,
    };
    let agent_sha = check_static("agent", &agent, AGENT_HINT)?;
    let busybox_sha = check_static("busybox", &opts.busybox, BUSYBOX_HINT)?;
    let mut extras = Vec::new();
    for p in &opts.extras {
        let sha = check_static("extra", p, EXTRA_HINT)?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ImageError::Binary {
                what: "extra",
                path: p.clone(),
                message: "has no file name".into(),
            })?;
        let path = format!("/usr/bin/{name}");
        if extras.iter().any(|e: &(Extra, PathBuf)| e.0.path == path) {
            return Err(ImageError::DuplicateExtra(name));
        }
        extras.push((Extra { path, sha256: sha }, p.clone()));
    }
    extras.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    let policy_sha = match &opts.policy {
        Some(p) => {
            kata_agent_policy::Policy::from_file(p).map_err(|e| ImageError::Policy {
                path: p.clone(),
                message: e.to_string(),
            })?;
            Some(manifest::sha256_file(p)?)
        }
        None => None,
    };
    let extra_list: Vec<Extra> = extras.iter().map(|e| e.0.clone()).collect();

    let built = match opts.kernel {
        KernelChoice::Debian => None,
        KernelChoice::KataRs => {
            Some(kernel_build::cached(&opts.cache_dir).ok_or(ImageError::KernelNotBuilt)?)
        }
        KernelChoice::Auto => {
            let b = kernel_build::cached(&opts.cache_dir);
            if b.is_none() {
                eprintln!(
                    "kata-rs's guest kernel is not built (`kata-ctl image kernel`): \
                     the image gets Debian's cloud kernel"
                );
            }
            b
        }
    };
    let (package, version) = match &built {
        Some(tree) => {
            step(
                1,
                &format!("kata-rs's kernel, built in {}", tree.root.display()),
            );
            (
                kernel_build::PACKAGE.to_string(),
                kernel_build::version_of(&tree.root),
            )
        }
        None => {
            step(1, "resolving the kernel package with apt-cache");
            let package = match &opts.kernel_package {
                Some(p) => p.clone(),
                None => kernel::default_package()?,
            };
            let version = kernel::candidate_version(&package)?;
            (package, version)
        }
    };
    let inputs = Inputs {
        format: manifest::FORMAT,
        builder: kata_proto::VERSION,
        kernel_package: &package,
        kernel_package_version: &version,
        agent: &agent_sha,
        busybox: &busybox_sha,
        extras: &extra_list,
        required_modules: modules::REQUIRED,
        optional_modules: modules::OPTIONAL,
        policy: policy_sha.as_deref(),
    };
    let digest = inputs.digest();
    if let Some(m) = up_to_date(&opts.output, &digest) {
        eprintln!(
            "guest image is up to date: {} ({})",
            opts.output.display(),
            m.kver
        );
        return Ok(BuildReport {
            manifest: m,
            up_to_date: true,
        });
    }

    let (tree, cached) = match &built {
        Some(tree) => (tree.clone(), true),
        None => {
            let mut n = 1;
            kernel::fetch(&opts.cache_dir, &package, &version, |text| {
                n += 1;
                step(n, text);
            })?
        }
    };
    if built.is_some() {
        step(
            3,
            "no modules to take: the kernel has every driver built in",
        );
    } else if cached {
        step(3, "kernel package already unpacked");
    }
    step(4, &format!("resolving kernel modules of {}", tree.kver));
    let builtin = tree.builtin()?;
    let res = {
        let lookup = tree.module_lookup()?;
        modules::resolve(modules::REQUIRED, modules::OPTIONAL, &builtin, lookup)?
    };
    tracing::debug!(?res.builtin, ?res.absent_optional, "module resolution");

    let mut archive = cpio::Archive::new();
    populate_base(&mut archive, &agent, &opts.busybox)?;
    let mut module_paths = Vec::new();
    for m in &res.load_order {
        let src = tree.modules_dir().join(&m.path);
        let bytes = kernel::read_module(&src).map_err(|message| modules::ModulesError::Read {
            module: modules::name_of(&m.path),
            message,
        })?;
        let rel = kernel::uncompressed_name(&m.path);
        let bytes = kernel::strip_signature(bytes);
        archive.bytes(&format!("lib/modules/{}/{rel}", tree.kver), 0o644, bytes)?;
        module_paths.push(rel);
    }
    let mut list = module_paths.join("\n");
    list.push('\n');
    archive.bytes(MODULES_LIST, 0o644, list.into_bytes())?;
    for (e, src) in &extras {
        archive.file(&e.path, 0o755, src)?;
    }
    if let Some(p) = &opts.policy {
        archive.dir("etc/kata-opa", 0o755)?;
        archive.file(POLICY_PATH, 0o644, p)?;
    }

    // Everything is written next to the output, then renamed into place.
    let parent = opts.output.parent().unwrap_or(Path::new(".")).to_path_buf();
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let name = name.unwrap_or_else(|| "guest".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<Manifest, ImageError> {
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        step(
            5,
            &format!(
                "writing initramfs ({} modules, uncompressed cpio)",
                module_paths.len()
            ),
        );
        let initrd = tmp.join("initrd.img");
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&initrd).map_err(io_err(&initrd))?);
        let initrd_size = archive.write_to(&mut f)?;
        f.into_inner()
            .map_err(|e| ImageError::Io {
                path: initrd.clone(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(io_err(&initrd))?;
        let vmlinuz = tmp.join("vmlinuz");
        std::fs::copy(&tree.vmlinuz, &vmlinuz).map_err(io_err(&vmlinuz))?;
        let m = Manifest {
            format: manifest::FORMAT,
            kernel_package: package.clone(),
            kernel_package_version: version.clone(),
            kver: tree.kver.clone(),
            agent_version: kata_proto::VERSION.into(),
            modules: module_paths.clone(),
            builtin_modules: res.builtin.clone(),
            absent_modules: res.absent_optional.clone(),
            extras: extra_list.clone(),
            sha256: Checksums {
                vmlinuz: manifest::sha256_file(&vmlinuz)?,
                initrd: manifest::sha256_file(&initrd)?,
                agent: agent_sha.clone(),
                busybox: busybox_sha.clone(),
            },
            initrd_size,
            inputs_digest: digest.clone(),
            policy: policy_sha.clone(),
        };
        let mpath = tmp.join(manifest::FILE);
        let mut mf = std::fs::File::create(&mpath).map_err(io_err(&mpath))?;
        mf.write_all(m.to_json().as_bytes())
            .map_err(io_err(&mpath))?;
        mf.sync_all().map_err(io_err(&mpath))?;
        step(6, &format!("installing into {}", opts.output.display()));
        replace_dir(&tmp, &opts.output)?;
        Ok(m)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let m = result?;
    eprintln!(
        "guest image built in {:.1}s: kernel {} ({}), initrd {} MiB, {} modules",
        started.elapsed().as_secs_f64(),
        m.kver,
        m.kernel_package_version,
        m.initrd_size / (1 << 20),
        m.modules.len()
    );
    Ok(BuildReport {
        manifest: m,
        up_to_date: false,
    })
}

/// The directories, device nodes, `/init`, busybox and its links.
fn populate_base(a: &mut cpio::Archive, agent: &Path, busybox: &Path) -> Result<(), ImageError> {
    for (d, perm) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
        ("root", 0o700),
        ("bin", 0o755),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("lib", 0o755),
        ("lib/modules", 0o755),
    ] {
        a.dir(d, perm)?;
    }
    a.chardev("dev/console", 0o600, 5, 1)?;
    a.chardev("dev/null", 0o666, 1, 3)?;
    a.file("init", 0o755, agent)?;
    a.file("bin/busybox", 0o755, busybox)?;
    for applet in APPLETS {
        a.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    a.bytes(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    )?;
    a.bytes("etc/group", 0o644, b"root:x:0:\n".to_vec())?;
    Ok(())
}

/// Swaps `new` in place of `dst` (renaming the old one aside first).
fn replace_dir(new: &Path, dst: &Path) -> Result<(), ImageError> {
    if dst.exists() {
        let old = dst.with_file_name(format!(
            ".{}.old-{}",
            dst.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dst, &old).map_err(io_err(dst))?;
        if let Err(e) = std::fs::rename(new, dst) {
            let _ = std::fs::rename(&old, dst);
            return Err(ImageError::Io {
                path: dst.into(),
                source: e,
            });
        }
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(new, dst).map_err(io_err(dst))?;
    }
    Ok(())
}

/// The existing manifest, if `dir` holds an intact image built from `digest`.
fn up_to_date(dir: &Path, digest: &str) -> Option<Manifest> {
    let m = Manifest::load(&dir.join(manifest::FILE)).ok()?;
    if m.inputs_digest != digest {
        return None;
    }
    verify(dir, &m).ok()?;
    Some(m)
}

/// Checks that the kernel and initramfs in `dir` match the manifest's checksums.
pub fn verify(dir: &Path, m: &Manifest) -> Result<(), String> {
    for (file, want) in [
        ("vmlinuz", &m.sha256.vmlinuz),
        ("initrd.img", &m.sha256.initrd),
    ] {
        let got = manifest::sha256_file(&dir.join(file)).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!(
                "{}: sha256 {got} does not match the manifest",
                dir.join(file).display()
            ));
        }
    }
    Ok(())
}
