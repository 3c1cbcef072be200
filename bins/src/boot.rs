//! `kata-ctl boot`: boots one VM under a real launcher, asks the agent for the
//! guest's details, prints them, and powers the VM off. The shortest path through
//! every part of kata-rs: what `make run` shows.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kata_proto::agent::agent_service_client::AgentServiceClient;
use kata_proto::agent::{DestroySandboxRequest, GuestDetailsRequest};
use kata_proto::config::Config;
use kata_proto::launcher::{Accelerator, CreateVmRequest, StartVmRequest, VmSpec};
use kata_vmm_launcher::client::LauncherProcess;

/// `kata-ctl boot` arguments.
#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Directory with vmlinuz and initrd.img; default: the configuration's kernel and initrd.
    #[arg(long)]
    pub guest_dir: Option<PathBuf>,
    /// The launcher binary; default: kata-vmm-launcher next to kata-ctl.
    #[arg(long)]
    pub launcher: Option<PathBuf>,
    /// Configuration file (else $KATA_CONF_FILE, else the default locations).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Keep the guest console here (default: in the sandbox directory, removed
    /// with it).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Extra kernel parameters, e.g. `agent.log=debug`.
    #[arg(long, default_value = "")]
    pub kernel_params: String,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// Boots, prints, powers off.
pub async fn run(args: BootArgs) -> anyhow::Result<()> {
    let cfg = Config::discover(args.config.as_deref())?;
    let q = &cfg.hypervisor.qemu;
    let (kernel, initrd) = match &args.guest_dir {
        // the launcher takes absolute paths only
        Some(d) => {
            let d = std::path::absolute(d)?;
            (d.join("vmlinuz"), d.join("initrd.img"))
        }
        None => (q.kernel.clone(), q.initrd.clone()),
    };
    let launcher = match args.launcher.clone() {
        Some(l) => l,
        None => std::env::current_exe()?.with_file_name("kata-vmm-launcher"),
    };
    let id = format!("kata-ctl-boot-{}", std::process::id());
    let dir = kata_proto::paths::run_dir().join(&id);
    let t0 = Instant::now();
    let mut l = LauncherProcess::spawn(&launcher, &id, &dir, Duration::from_secs(10)).await?;
    let result = boot(&mut l, &cfg, &args, kernel, initrd, t0).await;
    let _ = l.client.shutdown(()).await;
    let _ = l.child.wait().await;
    result
}

async fn boot(
    l: &mut LauncherProcess,
    cfg: &Config,
    args: &BootArgs,
    kernel: PathBuf,
    initrd: PathBuf,
    t0: Instant,
) -> anyhow::Result<()> {
    let q = &cfg.hypervisor.qemu;
    let accelerator = match q.accelerator.as_str() {
        "kvm" => Accelerator::Kvm,
        "tcg" => Accelerator::Tcg,
        _ => Accelerator::Auto,
    };
    let spec = VmSpec {
        vcpus: q.default_vcpus,
        memory_mib: q.default_memory,
        kernel_path: kernel.display().to_string(),
        initrd_path: initrd.display().to_string(),
        kernel_params: format!("{} {}", q.kernel_params, args.kernel_params)
            .trim()
            .to_string(),
        console_log_path: args
            .console_log
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        accelerator: accelerator as i32,
        hypervisor_path: q.path.display().to_string(),
        machine_type: q.machine_type.clone(),
        firmware_path: q.firmware.display().to_string(),
        ..Default::default()
    };
    let created = l
        .client
        .create_vm(CreateVmRequest { spec: Some(spec) })
        .await?
        .into_inner();
    let accel = Accelerator::try_from(created.accelerator).unwrap_or(Accelerator::Unspecified);
    eprintln!(
        "VM created: QEMU pid {} ({:?}), vsock {}",
        created.hypervisor_pid, accel, created.vsock_uds_path
    );
    let started = l
        .client
        .start_vm(StartVmRequest {
            agent_ready_timeout_seconds: u32::try_from(args.timeout).unwrap_or(120),
        })
        .await?
        .into_inner();
    eprintln!(
        "agent ready {:.2} s after StartVm",
        started.agent_ready_us as f64 / 1e6
    );
    let addr = kata_proto::dialer::Address::Hybrid {
        path: created.vsock_uds_path.into(),
        port: kata_proto::paths::ports::AGENT,
    };
    let ch = kata_proto::dialer::channel(&addr, Duration::from_secs(10)).await?;
    let mut agent = AgentServiceClient::new(ch);
    let d = agent
        .get_guest_details(GuestDetailsRequest {
            mem_block_size: true,
            mem_hotplug_probe: false,
        })
        .await?
        .into_inner();
    let a = d.agent_details.unwrap_or_default();
    println!("guest kernel:   {} {}", d.kernel_release, d.kernel_version);
    println!("guest vCPUs:    {}", d.online_vcpus);
    println!(
        "guest memory:   {} MiB total, {} MiB available",
        d.mem_total_bytes >> 20,
        d.mem_available_bytes >> 20
    );
    println!("guest uptime:   {:.2} s", d.uptime_seconds);
    println!(
        "agent:          kata-agent {} (features: {})",
        a.version,
        a.features.join(", ")
    );
    agent.destroy_sandbox(DestroySandboxRequest {}).await?;
    let exit = l.client.wait_vm(()).await?.into_inner();
    eprintln!(
        "VM exited: {} after {:.2} s in all",
        exit.reason,
        t0.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        exit.reason == "poweroff",
        "the VM did not power off cleanly: {exit:?}"
    );
    Ok(())
}
