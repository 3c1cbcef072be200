//! `kata-ctl policy`: the agent policy from the host's side.
//!
//! - `log`: the policy debug log of a pod (the agent's decision lines on the
//!   guest console, with `agent.policy_debug` on the kernel command line) as
//!   JSON lines, one per checked request;
//! - `eval`: replays such a log against a policy, with the agent's engine,
//!   and says where a decision differs;
//! - `generate`: a policy that allows exactly the container of an OCI spec;
//! - `annotation`: the pod annotation that carries a policy.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use kata_agent_policy::{LogRecord, Policy};
use kata_proto::paths::SandboxPaths;
use serde_json::{json, Value};

/// The pod annotation whose value (base64) is the policy the shim gives the
/// agent with SetPolicy.
pub const ANNOTATION: &str = "io.katacontainers.config.agent.policy";

/// `kata-ctl policy` commands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Prints a pod's policy debug log (every checked request: its name, its
    /// input, the decision) as JSON lines, from the guest console log.
    /// The pod needs `agent.policy_debug` in its kernel parameters.
    Log {
        /// The sandbox: its console log under $KATA_RUN_DIR/<ID> (else /run/kata/<ID>).
        #[arg(long, value_name = "ID", required_unless_present = "file")]
        sandbox: Option<String>,
        /// A console log file to read instead.
        #[arg(long, value_name = "FILE", conflicts_with = "sandbox")]
        file: Option<PathBuf>,
    },
    /// Replays a policy debug log against POLICY and prints each decision;
    /// exit status 1 if any differs from the recorded one.
    Eval {
        /// The policy (Rego).
        policy: PathBuf,
        /// The log, as `kata-ctl policy log` prints it (- for stdin).
        inputs: PathBuf,
    },
    /// Writes a policy that allows exactly the container of an OCI spec (its
    /// args, env, user, capabilities, cwd, no_new_privileges, mounts, rootfs
    /// and mount read-only flags) and every request a pod needs, and denies
    /// ExecProcess (except the commands given) and SetPolicy.
    Generate {
        /// An OCI bundle directory or its config.json (the spec containerd
        /// gives the runtime). Repeat for the containers of a pod.
        #[arg(required = true)]
        bundles: Vec<PathBuf>,
        /// A command ExecProcess may run, as a JSON list of its arguments,
        /// e.g. '["cat", "/etc/hostname"]' (repeatable).
        #[arg(long = "allow-exec", value_name = "JSON")]
        allow_exec: Vec<String>,
        /// Where to write the policy (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Prints `io.katacontainers.config.agent.policy=<base64>` for a policy
    /// file, for `ctr run --annotation` or a pod's annotations.
    Annotation {
        /// The policy (Rego); it must parse.
        policy: PathBuf,
    },
}

/// Runs a `kata-ctl policy` command.
pub fn run(cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Log { sandbox, file } => {
            let files = match (sandbox, file) {
                (_, Some(f)) => vec![f],
                (Some(id), None) => {
                    kata_proto::ids::check("--sandbox", &id)?;
                    let log = SandboxPaths::new(&id).console_log();
                    if !log.exists() {
                        bail!(
                            "{}: no console log (is sandbox {id} running on this host?)",
                            log.display()
                        );
                    }
                    // the older half first
                    let mut old = log.clone().into_os_string();
                    old.push(".1");
                    vec![PathBuf::from(old), log]
                }
                (None, None) => bail!("give --sandbox ID or --file FILE"),
            };
            let mut out = std::io::stdout().lock();
            let mut n = 0;
            for f in files.iter().filter(|f| f.exists()) {
                for r in read_log(f)? {
                    writeln!(out, "{}", serde_json::to_string(&r)?)?;
                    n += 1;
                }
            }
            if n == 0 {
                eprintln!(
                    "no policy decisions in the log: is agent.policy_debug among the pod's \
                     kernel parameters, and the agent built with policy support?"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Eval { policy, inputs } => eval(&policy, &inputs),
        PolicyCommand::Generate {
            bundles,
            allow_exec,
            output,
        } => {
            let text = generate(&bundles, &allow_exec)?;
            Policy::from_text("the generated policy", &text)
                .context("the generated policy does not parse (a kata-ctl bug)")?;
            match output {
                Some(p) => std::fs::write(&p, text).with_context(|| p.display().to_string())?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Annotation { policy } => {
            let text = std::fs::read_to_string(&policy)
                .with_context(|| format!("reading {}", policy.display()))?;
            Policy::from_text(&policy.display().to_string(), &text)?;
            println!(
                "{ANNOTATION}={}",
                base64::engine::general_purpose::STANDARD.encode(text)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The decision records in a console log (other lines are skipped).
fn read_log(path: &Path) -> Result<Vec<LogRecord>> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if let Some(r) = LogRecord::from_line(&String::from_utf8_lossy(&line)) {
            out.push(r);
        }
    }
    Ok(out)
}

fn eval(policy: &Path, inputs: &Path) -> Result<ExitCode> {
    let mut p = Policy::from_file(policy)?;
    let reader: Box<dyn BufRead> = if inputs == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(inputs).with_context(|| format!("reading {}", inputs.display()))?,
        ))
    };
    let (mut same, mut differ) = (0usize, 0usize);
    let mut out = std::io::stdout().lock();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", inputs.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: LogRecord = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a policy log record ({{request, input, allowed}})",
                inputs.display(),
                n + 1
            )
        })?;
        let decision = p.check(&r.request, &r.input.to_string());
        let allowed = decision.is_ok();
        let word = |a: bool| if a { "allowed" } else { "denied" };
        if allowed == r.allowed {
            same += 1;
            writeln!(out, "{:>5} {} {}", n + 1, r.request, word(allowed))?;
        } else {
            differ += 1;
            let why = decision
                .err()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            writeln!(
                out,
                "{:>5} {} {} (recorded: {}) DIFFERS{why}",
                n + 1,
                r.request,
                word(allowed),
                word(r.allowed)
            )?;
        }
    }
    writeln!(
        out,
        "{same} decisions as recorded, {differ} different ({})",
        policy.display()
    )?;
    Ok(if differ == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Requests a generated policy restricts; every other request a pod makes
/// is allowed.
const RESTRICTED: &[&str] = &[
    "CreateContainerRequest",
    "ExecProcessRequest",
    "SetPolicyRequest",
];

/// The rules of a generated policy (Rego v0, as the agent reads policies).
/// The agent's input is the OCI spec as it parses it (`input.OCI`, OCI JSON
/// names); the shim has rewritten the rootfs path and the bind sources into
/// the pod's share, so those are not compared, the mounts' destinations,
/// types and options (the read-only flag among them) are.
const RULES: &str = r#"
CreateContainerRequest {
    c := policy_containers[_]
    container_matches(c)
}

container_matches(c) {
    p := input.OCI.process
    p.args == c.process.args
    object.get(p, "env", []) == c.process.env
    p.user == c.process.user
    object.get(p, "cwd", "") == c.process.cwd
    cap_sets(object.get(p, "capabilities", {})) == cap_sets(c.process.capabilities)
    object.get(p, "noNewPrivileges", false) == c.process.noNewPrivileges
    object.get(input.OCI.root, "readonly", false) == c.readonly_root
    guest_mounts == c.mounts
}

# capabilities are sets (their order in a spec means nothing)
cap_sets(c) := {k: v |
    k := ["ambient", "bounding", "effective", "inheritable", "permitted"][_]
    v := {x | x := object.get(c, k, [])[_]}
}

guest_mounts := [m |
    x := object.get(input.OCI, "mounts", [])[_]
    m := {
        "destination": x.destination,
        "type": object.get(x, "type", ""),
        "options": object.get(x, "options", []),
    }
]

ExecProcessRequest {
    input.process.args == policy_exec[_]
}
"#;

/// The policy allowing the containers of `bundles` (and the exec commands).
pub fn generate(bundles: &[PathBuf], allow_exec: &[String]) -> Result<String> {
    let mut containers = Vec::new();
    for b in bundles {
        let path = if b.is_dir() {
            b.join("config.json")
        } else {
            b.clone()
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let spec: oci_spec::runtime::Spec = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an OCI runtime spec", path.display()))?;
        containers.push(container_of(&spec).with_context(|| path.display().to_string())?);
    }
    let mut exec = Vec::new();
    for e in allow_exec {
        let args: Vec<String> = serde_json::from_str(e).with_context(|| {
            format!("--allow-exec {e}: expected a JSON list of strings, e.g. '[\"ls\", \"/\"]'")
        })?;
        if args.is_empty() {
            bail!("--allow-exec {e}: the command is empty");
        }
        exec.push(args);
    }
    let proto = include_str!("../../proto/protos/agent.proto");
    let mut text = String::from(
        "# Generated by kata-ctl policy generate: allows the containers below and\n\
         # the requests a pod needs; ExecProcess only for the listed commands;\n\
         # no SetPolicy.\npackage agent_policy\n\n",
    );
    for n in kata_agent_policy::request_names(proto) {
        let allowed = !RESTRICTED.contains(&n.as_str());
        text.push_str(&format!("default {n} := {allowed}\n"));
    }
    text.push_str(RULES);
    text.push_str(&format!(
        "\npolicy_containers := {}\n\npolicy_exec := {}\n",
        serde_json::to_string_pretty(&containers)?,
        serde_json::to_string_pretty(&exec)?
    ));
    Ok(text)
}

/// What a policy compares of one container, normalised as the agent
/// normalises a spec (parsed by oci-spec, written back).
fn container_of(spec: &oci_spec::runtime::Spec) -> Result<Value> {
    let spec = serde_json::to_value(spec)?;
    let Some(p) = spec.get("process") else {
        bail!("the spec has no process");
    };
    let mounts: Vec<Value> = spec
        .get("mounts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !dropped_by_shim(m))
        .map(|m| {
            let bind = is_bind(&m);
            json!({
                "destination": m["destination"],
                // the shim makes every bind mount a "bind" of the share
                "type": if bind { json!("bind") } else { m.get("type").cloned().unwrap_or(json!("")) },
                "options": m.get("options").cloned().unwrap_or(json!([])),
            })
        })
        .collect();
    Ok(json!({
        "process": {
            "args": p.get("args").cloned().unwrap_or(json!(null)),
            "env": p.get("env").cloned().unwrap_or(json!([])),
            "user": p.get("user").cloned().unwrap_or(json!(null)),
            "cwd": p.get("cwd").cloned().unwrap_or(json!("")),
            "capabilities": p.get("capabilities").cloned().unwrap_or(json!({})),
            "noNewPrivileges": p.get("noNewPrivileges").cloned().unwrap_or(json!(false)),
        },
        "readonly_root": spec.pointer("/root/readonly").cloned().unwrap_or(json!(false)),
        "mounts": mounts,
    }))
}

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Bind mounts of host /dev, /proc and /sys do not reach the guest (the
/// shim drops them; /dev/shm excepted), so the agent never sees them.
fn dropped_by_shim(m: &Value) -> bool {
    if !is_bind(m) {
        return false;
    }
    let src = m.get("source").and_then(Value::as_str).unwrap_or_default();
    let src = Path::new(src);
    ["/dev", "/proc", "/sys"].iter().any(|p| src.starts_with(p)) && !src.starts_with("/dev/shm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_policies_parse_and_restrict() {
        let d = tempfile::tempdir().unwrap();
        let spec = json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "process": {"args": ["sleep", "1"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": ["PATH=/bin"]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "none", "source": "/tmp/x", "options": ["rbind", "ro"]},
                {"destination": "/dev/kmsg", "type": "bind", "source": "/dev/kmsg", "options": ["rbind"]}
            ]
        });
        let f = d.path().join("config.json");
        std::fs::write(&f, spec.to_string()).unwrap();
        let text = generate(&[d.path().to_path_buf()], &[r#"["ls", "/"]"#.into()]).unwrap();
        let p = Policy::from_text("gen", &text).unwrap();
        drop(p);
        assert!(text.contains("default SetPolicyRequest := false"), "{text}");
        assert!(
            text.contains("default StartContainerRequest := true"),
            "{text}"
        );
        // /dev/kmsg is dropped by the shim, /data becomes a bind
        assert!(!text.contains("/dev/kmsg"), "{text}");
        assert!(text.contains("\"bind\""), "{text}");
        assert!(generate(std::slice::from_ref(&f), &["ls".into()]).is_err());
        assert!(generate(&[d.path().join("nope.json")], &[]).is_err());
    }
}
