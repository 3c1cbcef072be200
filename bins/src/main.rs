//! kata-ctl: the kata-rs operator tool (host checks, guest image, boot, agent client).

mod agent;
mod boot;
mod check;
mod env;
mod exec;
mod image;
mod oci_image;
mod policy;
mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kata-rs operator tool.
#[derive(Debug, Parser)]
#[command(name = "kata-ctl", version = kata_proto::VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The guest image (kernel + initramfs).
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Checks whether this host can run kata-rs pods.
    Check {
        /// Print details under each check.
        #[arg(long)]
        verbose: bool,
        /// Accepted for compatibility with Kata's kata-ctl; kata-rs makes no network
        /// checks (there is no release check to skip).
        #[arg(long)]
        no_network_checks: bool,
        /// Configuration file (default: $KATA_CONF_FILE, then the standard paths).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Prints the configuration a pod created now would get (which file,
    /// every key with its effective value, the helper binaries), as TOML.
    Env {
        /// Configuration file (default: $KATA_CONF_FILE, then the standard paths).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Boots one VM under kata-vmm-launcher, prints the guest's details as the
    /// agent reports them, and powers it off.
    Boot(boot::BootArgs),
    /// Talks to an agent directly (Kata's agent-ctl): any AgentService or
    /// Health RPC with a JSON request, or one stdio stream of a process.
    Agent(agent::AgentArgs),
    /// A shell in a pod's guest through the agent's debug console (Kata's
    /// `kata-runtime exec`; the pod needs debug_console_enabled).
    Exec(exec::ExecArgs),
    /// Prints one pod's metrics (Prometheus text) from its shim's management
    /// socket: what kata-monitor serves for it, without Prometheus.
    Metrics {
        /// The pod (sandbox) id.
        id: String,
        /// The pod's directory (default: $KATA_RUN_DIR/<ID>, else /run/kata/<ID>).
        #[arg(long, value_name = "DIR")]
        sandbox_dir: Option<PathBuf>,
    },
    /// The agent policy: a pod's decision log, replaying it against a
    /// policy, generating a policy from a container's spec, the annotation.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Tracing: where a container's start went, from its trace's spans.
    Trace {
        #[command(subcommand)]
        command: trace::TraceCommand,
    },
    /// Prints the reference page of every configuration key (Markdown, the
    /// documentation site's docs/reference/configuration-keys.md), from the
    /// packaged configuration file and the configuration code.
    ConfigReference {
        /// The packaged configuration file.
        #[arg(long, default_value = "config/configuration.toml")]
        packaged: PathBuf,
    },
    /// Writes a busybox container image as an OCI image layout tar, for
    /// `ctr image import` (no registry needed).
    OciImage {
        /// The tar to write.
        #[arg(long)]
        output: PathBuf,
        /// The image name (`org.opencontainers.image.ref.name`).
        #[arg(long, default_value = oci_image::DEFAULT_NAME)]
        name: String,
        /// A static busybox (Debian's busybox-static).
        #[arg(long, default_value = image::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
        /// The image's command, one argument per flag (default `sh`). A
        /// pod's sandbox (pause) image: `--cmd sleep --cmd inf`.
        #[arg(long = "cmd", value_name = "ARG")]
        cmd: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Builds kata-rs's guest kernel from Debian's linux-source package and
    /// the configuration fragments (once: it is cached by source version and
    /// configuration hash), or with --check, checks the built kernel's
    /// configuration against the fragments.
    Kernel {
        /// Cache of kernels (the image build looks there).
        #[arg(long, default_value = image::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Parallel compile jobs (default: the CPUs this process may use).
        #[arg(long)]
        jobs: Option<usize>,
        /// Only check the built kernel's configuration: every option the
        /// fragments ask for must have taken effect.
        #[arg(long)]
        check: bool,
    },
    /// Builds vmlinuz, initrd.img and manifest.json from a Debian cloud kernel
    /// package (apt-get download), the agent and a static busybox.
    Build {
        /// Output directory.
        #[arg(long, default_value = kata_proto::config::DEFAULT_GUEST_DIR)]
        output: PathBuf,
        /// The agent (a static binary; default: kata-agent next to kata-ctl).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// A static busybox (Debian's busybox-static).
        #[arg(long, default_value = image::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
        /// Kernel package (default: what linux-image-cloud-amd64 depends on),
        /// when the kernel is Debian's.
        #[arg(long)]
        kernel_package: Option<String>,
        /// The guest kernel: kata-rs's own (built by `kata-ctl image
        /// kernel`), Debian's cloud kernel, or kata-rs's when it is built.
        #[arg(long, value_enum, default_value = "auto")]
        kernel: image::KernelChoice,
        /// An extra static binary to put in /usr/bin (repeatable).
        #[arg(long = "extra")]
        extras: Vec<PathBuf>,
        /// Cache of downloaded kernel packages.
        #[arg(long, default_value = image::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// An agent policy (Rego) to install as the guest's default policy,
        /// /etc/kata-opa/default-policy.rego (Kata's AGENT_POLICY=yes; use with
        /// an agent built with the agent-policy feature).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Image {
            command:
                ImageCommand::Build {
                    output,
                    agent,
                    busybox,
                    kernel_package,
                    kernel,
                    extras,
                    cache_dir,
                    policy,
                },
        } => {
            let opts = image::BuildOptions {
                output,
                agent,
                busybox,
                kernel_package,
                kernel,
                extras,
                cache_dir,
                policy,
            };
            let report = image::build(&opts)?;
            tracing::debug!(kver = %report.manifest.kver, up_to_date = report.up_to_date, "image build done");
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command:
                ImageCommand::Kernel {
                    cache_dir,
                    jobs,
                    check,
                },
        } => {
            use image::kernel_build;
            if check {
                let (config, n) = kernel_build::check_built(&cache_dir)?;
                println!(
                    "{}: all {n} options of the fragments are set",
                    config.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let jobs =
                jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let (dir, cached) = kernel_build::build(&cache_dir, jobs, |line| {
                eprintln!("[kernel] {line}");
            })?;
            if cached {
                eprintln!("[kernel] already built: {}", dir.display());
            }
            println!("{}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Boot(args) => {
            let rt = kata_proto::runtime()?;
            rt.block_on(boot::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => agent::run(args),
        Command::Policy { command } => policy::run(command),
        Command::Trace { command } => trace::run(command),
        Command::Exec(args) => exec::run(args),
        Command::Metrics { id, sandbox_dir } => {
            kata_proto::ids::check("ID", &id)?;
            let paths = match sandbox_dir {
                Some(d) => kata_proto::paths::SandboxPaths::in_dir(d),
                None => kata_proto::paths::SandboxPaths::new(&id),
            };
            let sock = paths.shim_monitor_socket();
            let rt = kata_proto::runtime()?;
            let text = rt
                .block_on(kata_proto::http::get_unix(
                    &sock,
                    "/metrics",
                    std::time::Duration::from_secs(10),
                    kata_proto::metrics::MAX_TEXT,
                ))
                .map_err(|e| anyhow::anyhow!("{e} (is pod {id} running on this host?)"))?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Env { config } => {
            print!("{}", env::render(config.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::ConfigReference { packaged } => {
            let text = std::fs::read_to_string(&packaged)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", packaged.display()))?;
            let page = kata_proto::config::reference::render(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", packaged.display()))?;
            print!("{page}");
            Ok(ExitCode::SUCCESS)
        }
        Command::OciImage {
            output,
            name,
            busybox,
            cmd,
        } => {
            let cmd = if cmd.is_empty() {
                vec!["sh".into()]
            } else {
                cmd
            };
            let r = oci_image::build(&oci_image::Options {
                output: output.clone(),
                name: name.clone(),
                busybox,
                cmd,
            })?;
            eprintln!(
                "wrote {} ({} bytes): {name} {} with {} applets; import with `ctr image import {}`",
                output.display(),
                r.size,
                r.manifest_digest,
                r.applets,
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            verbose,
            no_network_checks: _,
            config,
        } => {
            let ok = check::run(config.as_deref(), verbose)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn main() -> ExitCode {
    kata_proto::logging::init("kata-ctl", None);
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kata-ctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
