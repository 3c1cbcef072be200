//! `kata-ctl agent`: the developer's client of the agent, like Kata's
//! agent-ctl. Sends any AgentService or Health RPC with a JSON request and
//! prints the JSON reply; `attach` copies one stdio stream of a process.
//!
//! The JSON forms are the prost types' serde forms (Rust field names, absent
//! fields default). Unknown fields are an error, not silently dropped: the
//! request is decoded, encoded back, and every input key must reappear.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kata_proto::agent::agent_service_client::AgentServiceClient;
use kata_proto::agent::health_client::HealthClient;
use kata_proto::agent::*;
use kata_proto::dialer::Address;
use kata_proto::paths::{ports, SandboxPaths};
use kata_proto::stdio::{AttachError, Which};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// The largest message either way (CopyFile chunks, big specs).
const MAX_MESSAGE: usize = 64 << 20;

/// `kata-ctl agent` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = after_help(), subcommand_value_name = "RPC [REQUEST] | attach")]
pub struct AgentArgs {
    /// The agent's address: vsock://CID:PORT, hvsock:///PATH/vsock.sock:PORT, or
    /// unix:///PATH (a host-mode agent).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["sandbox", "sandbox_dir"])]
    addr: Option<Address>,
    /// The sandbox whose agent to reach: its hybrid vsock socket, agent port 1024.
    #[arg(long, value_name = "ID")]
    sandbox: Option<String>,
    /// The sandbox's directory, as given to kata-vmm-launcher --sandbox-dir
    /// (default: $KATA_RUN_DIR/<ID>, else /run/kata/<ID>).
    #[arg(long, value_name = "DIR")]
    sandbox_dir: Option<PathBuf>,
    /// Seconds to wait for the connection (and for the stdio port's answer).
    /// Calls themselves have no deadline (WaitProcess may take long).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    /// Copies one stdio stream of a process: its stdout or stderr to this
    /// stdout, or this stdin to its stdin (closing its input at end of file).
    Attach {
        /// Which stream.
        #[arg(value_enum)]
        stream: StreamArg,
        /// The container.
        container_id: String,
        /// The exec id (default: the container's init process).
        exec_id: Option<String>,
    },
    /// `<RPC> [REQUEST]`: see below.
    #[command(external_subcommand)]
    Rpc(Vec<String>),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StreamArg {
    Stdin,
    Stdout,
    Stderr,
}

impl From<StreamArg> for Which {
    fn from(s: StreamArg) -> Which {
        match s {
            StreamArg::Stdin => Which::Stdin,
            StreamArg::Stdout => Which::Stdout,
            StreamArg::Stderr => Which::Stderr,
        }
    }
}

/// Why a command failed; each kind has its exit code.
enum Failure {
    /// Bad input (exit 2): the message says what was wrong.
    Usage(String),
    /// Connection or stream trouble (exit 1).
    Io(String),
    /// The agent answered a gRPC error (exit 1).
    Status(tonic::Status),
}

fn agent(ch: Channel) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn health(ch: Channel) -> HealthClient<Channel> {
    HealthClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Generates the RPC table and the dispatcher: one line per RPC, `client
/// "KataName" method(RequestType)`.
macro_rules! rpcs {
    ($($client:ident $name:literal $method:ident($req:ty);)*) => {
        /// Every RPC, in Kata's spelling.
        const RPC_NAMES: &[&str] = &[$($name),*];

        /// Decodes `req` as the request of `rpc` (a name from [`RPC_NAMES`]),
        /// connects, calls, and returns the reply as JSON.
        async fn call(
            rpc: &str,
            req: Value,
            addr: &Address,
            timeout: Duration,
        ) -> Result<Value, Failure> {
            match rpc {
                $($name => {
                    let req: $req = decode(req).map_err(Failure::Usage)?;
                    let ch = connect(addr, timeout).await?;
                    let reply = $client(ch).$method(req).await.map_err(Failure::Status)?;
                    serde_json::to_value(reply.into_inner())
                        .map_err(|e| Failure::Io(format!("encoding the reply: {e}")))
                })*
                other => Err(Failure::Usage(format!("unknown RPC {other:?}"))),
            }
        }
    };
}

rpcs! {
    agent "CreateContainer" create_container(CreateContainerRequest);
    agent "StartContainer" start_container(StartContainerRequest);
    agent "RemoveContainer" remove_container(RemoveContainerRequest);
    agent "ExecProcess" exec_process(ExecProcessRequest);
    agent "SignalProcess" signal_process(SignalProcessRequest);
    agent "WaitProcess" wait_process(WaitProcessRequest);
    agent "UpdateContainer" update_container(UpdateContainerRequest);
    agent "StatsContainer" stats_container(StatsContainerRequest);
    agent "PauseContainer" pause_container(PauseContainerRequest);
    agent "ResumeContainer" resume_container(ResumeContainerRequest);
    agent "ListProcesses" list_processes(ListProcessesRequest);
    agent "WriteStdin" write_stdin(WriteStreamRequest);
    agent "ReadStdout" read_stdout(ReadStreamRequest);
    agent "ReadStderr" read_stderr(ReadStreamRequest);
    agent "CloseStdin" close_stdin(CloseStdinRequest);
    agent "TtyWinResize" tty_win_resize(TtyWinResizeRequest);
    agent "UpdateInterface" update_interface(UpdateInterfaceRequest);
    agent "UpdateRoutes" update_routes(UpdateRoutesRequest);
    agent "ListInterfaces" list_interfaces(ListInterfacesRequest);
    agent "ListRoutes" list_routes(ListRoutesRequest);
    agent "AddARPNeighbors" add_arp_neighbors(AddArpNeighborsRequest);
    agent "GetMetrics" get_metrics(GetMetricsRequest);
    agent "GetOOMEvent" get_oom_event(GetOomEventRequest);
    agent "GetVolumeStats" get_volume_stats(VolumeStatsRequest);
    agent "CreateSandbox" create_sandbox(CreateSandboxRequest);
    agent "DestroySandbox" destroy_sandbox(DestroySandboxRequest);
    agent "GetGuestDetails" get_guest_details(GuestDetailsRequest);
    agent "OnlineCPUMem" online_cpu_mem(OnlineCpuMemRequest);
    agent "ReseedRandomDev" reseed_random_dev(ReseedRandomDevRequest);
    agent "MemHotplugByProbe" mem_hotplug_by_probe(MemHotplugByProbeRequest);
    agent "SetGuestDateTime" set_guest_date_time(SetGuestDateTimeRequest);
    agent "CopyFile" copy_file(CopyFileRequest);
    agent "AddSwap" add_swap(AddSwapRequest);
    agent "UpdateEphemeralMounts" update_ephemeral_mounts(UpdateEphemeralMountsRequest);
    agent "SetPolicy" set_policy(SetPolicyRequest);
    health "Check" check(CheckRequest);
    health "Version" version(CheckRequest);
}

fn after_help() -> String {
    let mut s = String::from("RPC is one of (any case; snake_case works too):\n");
    let mut line = String::new();
    for n in RPC_NAMES {
        if line.len() + n.len() > 76 {
            let _ = writeln!(s, " {line}");
            line.clear();
        }
        line.push(' ');
        line.push_str(n);
    }
    let _ = writeln!(s, " {line}");
    s.push_str(
        "\nREQUEST is a JSON object (default {}), @FILE, or - for stdin, with the\n\
         fields of the RPC's request (snake_case, as in the Rust types). oci_spec_json,\n\
         process.oci_process_json and resources.oci_resources_json may be given as\n\
         objects. The reply is printed as JSON; exit status 1 on a gRPC or connection\n\
         error, 2 on bad input.\n\n\
         Example:\n  \
         kata-ctl agent --sandbox ID CreateContainer @create.json\n  \
         kata-ctl agent --sandbox ID attach stdout c1 &\n  \
         kata-ctl agent --sandbox ID StartContainer '{\"container_id\": \"c1\"}'",
    );
    s
}

/// Runs `kata-ctl agent`.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let rt = kata_proto::runtime()?;
    Ok(match rt.block_on(command(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((what, f)) => match f {
            Failure::Usage(m) => {
                eprintln!("kata-ctl agent: {what}{m}");
                ExitCode::from(2)
            }
            Failure::Io(m) => {
                eprintln!("kata-ctl agent: {what}{m}");
                ExitCode::FAILURE
            }
            Failure::Status(s) => {
                eprintln!("kata-ctl agent: {what}{:?}: {}", s.code(), s.message());
                ExitCode::FAILURE
            }
        },
    })
}

/// Runs the command; an error comes with a prefix naming what failed.
async fn command(args: AgentArgs) -> Result<(), (String, Failure)> {
    let timeout = Duration::from_secs(args.timeout);
    let addr = || address(&args).map_err(|m| (String::new(), Failure::Usage(m)));
    match &args.command {
        AgentCommand::Attach {
            stream,
            container_id,
            exec_id,
        } => {
            let addr = addr()?;
            let exec_id = exec_id.as_deref().unwrap_or("");
            let what = format!(
                "attach {} {container_id}{}{exec_id}: ",
                Which::from(*stream).as_str().to_lowercase(),
                if exec_id.is_empty() { "" } else { " " }
            );
            attach(&addr, *stream, container_id, exec_id, timeout)
                .await
                .map_err(|f| (what, f))
        }
        AgentCommand::Rpc(words) => {
            let name = &words[0];
            let Some(rpc) = resolve(name) else {
                return Err((
                    String::new(),
                    Failure::Usage(format!(
                        "unknown RPC {name:?}; valid RPCs: {}",
                        RPC_NAMES.join(", ")
                    )),
                ));
            };
            let what = format!("{rpc}: ");
            let fail = |f| (what.clone(), f);
            if words.len() > 2 {
                return Err(fail(Failure::Usage(format!(
                    "too many arguments ({}): give the request as one JSON object",
                    words[2..].join(" ")
                ))));
            }
            let mut req = read_request(words.get(1).map(String::as_str)).map_err(fail)?;
            stringify_json_fields(rpc, &mut req);
            let addr = addr()?;
            let reply = call(rpc, req, &addr, timeout).await.map_err(fail)?;
            let reply = tidy_reply(rpc, reply);
            let text = serde_json::to_string_pretty(&reply)
                .map_err(|e| fail(Failure::Io(format!("printing the reply: {e}"))))?;
            println!("{text}");
            Ok(())
        }
    }
}

/// The agent's API address from the options.
fn address(args: &AgentArgs) -> Result<Address, String> {
    if let Some(a) = &args.addr {
        return Ok(a.clone());
    }
    let paths = match (&args.sandbox, &args.sandbox_dir) {
        (_, Some(dir)) => SandboxPaths::in_dir(dir),
        (Some(id), None) => {
            kata_proto::ids::SandboxId::new(id.as_str()).map_err(|e| e.to_string())?;
            SandboxPaths::new(id)
        }
        (None, None) => {
            return Err(
                "which agent? give --addr ADDR or --sandbox ID (see kata-ctl agent --help)".into(),
            )
        }
    };
    Ok(Address::Hybrid {
        path: paths.vsock_uds(),
        port: ports::AGENT,
    })
}

/// Kata's name of an RPC given in any case, with or without underscores.
fn resolve(name: &str) -> Option<&'static str> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let n = norm(name);
    RPC_NAMES.iter().copied().find(|r| norm(r) == n)
}

/// The request from the command line: inline JSON, `@file`, `-` (stdin), or `{}`.
fn read_request(arg: Option<&str>) -> Result<Value, Failure> {
    let (text, from) = match arg {
        None => return Ok(Value::Object(Map::new())),
        Some("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| Failure::Usage(format!("reading the request from stdin: {e}")))?;
            (s, "the request from stdin".to_string())
        }
        Some(a) if a.starts_with('@') => {
            let path = &a[1..];
            let s = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("reading the request from {path}: {e}")))?;
            (s, format!("the request in {path}"))
        }
        Some(a) => (a.to_string(), "the request".to_string()),
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Usage(format!("{from} is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Failure::Usage(format!(
            "{from} must be a JSON object, not {}",
            kind(&v)
        )));
    }
    Ok(v)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields that carry JSON as a string may be given as objects.
fn stringify_json_fields(rpc: &str, req: &mut Value) {
    let path: &[&str] = match rpc {
        "CreateContainer" => &["oci_spec_json"],
        "ExecProcess" => &["process", "oci_process_json"],
        "UpdateContainer" => &["resources", "oci_resources_json"],
        _ => return,
    };
    let mut v = req;
    for k in path {
        match v.get_mut(*k) {
            Some(x) => v = x,
            None => return,
        }
    }
    if v.is_object() {
        *v = Value::String(v.to_string());
    }
}

/// One step of a path into a JSON value.
#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn show(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

fn short_type_name<T>() -> &'static str {
    let n = std::any::type_name::<T>();
    n.rsplit("::").next().unwrap_or(n)
}

/// Decodes a request, naming the field at fault on a type error and refusing
/// fields the type does not have.
fn decode<T: DeserializeOwned + Serialize>(v: Value) -> Result<T, String> {
    let t: T = match serde_json::from_value(v.clone()) {
        Ok(t) => t,
        Err(e) => {
            let at = locate::<T>(&v);
            return Err(if at.is_empty() {
                format!("not a {}: {e}", short_type_name::<T>())
            } else {
                format!("field {}: {e}", show(&at))
            });
        }
    };
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut path = Vec::new();
    match unknown_field(&v, &back, &mut path) {
        None => Ok(t),
        Some(known) => Err(format!(
            "unknown field `{}` in {} (known fields{}: {})",
            show(&path),
            short_type_name::<T>(),
            if path.len() > 1 { " there" } else { "" },
            known.join(", ")
        )),
    }
}

/// The first key of `input` that `known` (the decoded value encoded back)
/// lacks: its path is left in `path`, the known keys at that level returned.
fn unknown_field(input: &Value, known: &Value, path: &mut Vec<Seg>) -> Option<Vec<String>> {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, iv) in i {
                path.push(Seg::Key(key.clone()));
                match k.get(key) {
                    None => return Some(k.keys().cloned().collect()),
                    Some(kv) => {
                        if let Some(r) = unknown_field(iv, kv, path) {
                            return Some(r);
                        }
                    }
                }
                path.pop();
            }
            None
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (iv, kv)) in i.iter().zip(k).enumerate() {
                path.push(Seg::Index(n));
                if let Some(r) = unknown_field(iv, kv, path) {
                    return Some(r);
                }
                path.pop();
            }
            None
        }
        _ => None,
    }
}

/// `root` keeping, at each level of `path`, only the member on the path.
fn pruned(root: &Value, path: &[Seg]) -> Value {
    match (root, path.split_first()) {
        (Value::Object(m), Some((Seg::Key(k), rest))) => {
            let mut o = Map::new();
            if let Some(v) = m.get(k) {
                o.insert(k.clone(), pruned(v, rest));
            }
            Value::Object(o)
        }
        (Value::Array(a), Some((Seg::Index(i), rest))) => {
            Value::Array(a.get(*i).map(|v| pruned(v, rest)).into_iter().collect())
        }
        _ => root.clone(),
    }
}

/// The deepest member of `root` that alone fails to decode as `T`: where a
/// serde type error is.
fn locate<T: DeserializeOwned>(root: &Value) -> Vec<Seg> {
    let mut path: Vec<Seg> = Vec::new();
    loop {
        let mut node = root;
        for seg in &path {
            node = match (node, seg) {
                (Value::Object(m), Seg::Key(k)) => &m[k],
                (Value::Array(a), Seg::Index(i)) => &a[*i],
                _ => return path,
            };
        }
        let children: Vec<Seg> = match node {
            Value::Object(m) => m.keys().cloned().map(Seg::Key).collect(),
            Value::Array(a) => (0..a.len()).map(Seg::Index).collect(),
            _ => return path,
        };
        let bad = children.into_iter().find(|c| {
            let mut p = path.clone();
            p.push(c.clone());
            serde_json::from_value::<T>(pruned(root, &p)).is_err()
        });
        match bad {
            Some(c) => path.push(c),
            None => return path,
        }
    }
}

/// Readable replies: `{}` for Empty, ListProcesses' list as text.
fn tidy_reply(rpc: &str, mut reply: Value) -> Value {
    if reply.is_null() {
        return Value::Object(Map::new());
    }
    if rpc == "ListProcesses" {
        if let Some(list) = reply.get_mut("process_list") {
            let bytes: Option<Vec<u8>> = list.as_array().and_then(|a| {
                a.iter()
                    .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect()
            });
            if let Some(text) = bytes.and_then(|b| String::from_utf8(b).ok()) {
                // format "json": the list itself, else the table as text
                *list = serde_json::from_str(&text).unwrap_or(Value::String(text));
            }
        }
    }
    reply
}

/// A channel to the agent.
async fn connect(addr: &Address, timeout: Duration) -> Result<Channel, Failure> {
    kata_proto::dialer::channel(addr, timeout)
        .await
        .map_err(|e| {
            // the dialer's error says it all; tonic's wrapper only adds "transport error"
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = src {
                if let Some(d) = c.downcast_ref::<kata_proto::dialer::DialError>() {
                    return Failure::Io(d.to_string());
                }
                src = c.source();
            }
            Failure::Io(error_chain(&e))
        })
}

/// An error and its sources, `a: b: c` (tonic's transport error says little alone).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// Copies one stdio stream between the process and this one.
async fn attach(
    addr: &Address,
    stream: StreamArg,
    container_id: &str,
    exec_id: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut s = kata_proto::stdio::attach(addr, stream.into(), container_id, exec_id, timeout)
        .await
        .map_err(|e| match e {
            AttachError::Refused { code, message, .. } => {
                Failure::Status(tonic::Status::new(code_of(&code), message))
            }
            e => Failure::Io(error_chain(&e)),
        })?;
    let io = |e: std::io::Error| Failure::Io(e.to_string());
    match stream {
        StreamArg::Stdin => {
            // std's stdin in a thread of its own: a blocking read must not hold
            // a runtime worker (nor the runtime's shutdown).
            let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
            std::thread::spawn(move || {
                let mut input = std::io::stdin().lock();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let r = std::io::Read::read(&mut input, &mut buf).map(|n| buf[..n].to_vec());
                    let end = !matches!(&r, Ok(b) if !b.is_empty());
                    if tx.blocking_send(r).is_err() || end {
                        return;
                    }
                }
            });
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk.map_err(io)?;
                if chunk.is_empty() {
                    break;
                }
                match s.write_all(&chunk).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        return Err(Failure::Io(
                            "the process's input was closed (it exited, or CloseStdin) before the end of ours"
                                .into(),
                        ))
                    }
                    Err(e) => return Err(io(e)),
                }
            }
            s.shutdown().await.map_err(io)
        }
        StreamArg::Stdout | StreamArg::Stderr => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                // blocking, and flushed at once: this is a terminal's copy loop
                let mut out = std::io::stdout().lock();
                std::io::Write::write_all(&mut out, &buf[..n]).map_err(io)?;
                std::io::Write::flush(&mut out).map_err(io)?;
            }
        }
    }
}

/// A gRPC code from its name (as the stdio port sends it).
fn code_of(name: &str) -> tonic::Code {
    use tonic::Code::*;
    [
        Ok,
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    ]
    .into_iter()
    .find(|c| format!("{c:?}") == name)
    .unwrap_or(Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(resolve("CreateContainer"), Some("CreateContainer"));
        assert_eq!(resolve("create_container"), Some("CreateContainer"));
        assert_eq!(resolve("add_arp_neighbors"), Some("AddARPNeighbors"));
        assert_eq!(resolve("online_cpu_mem"), Some("OnlineCPUMem"));
        assert_eq!(resolve("check"), Some("Check"));
        assert_eq!(resolve("nope"), None);
    }

    #[test]
    fn requests() {
        let mut v = serde_json::json!({"container_id": "c", "oci_spec_json": {"a": 1}});
        stringify_json_fields("CreateContainer", &mut v);
        let r: CreateContainerRequest = decode(v).unwrap();
        assert_eq!(r.oci_spec_json, r#"{"a":1}"#);

        let e = decode::<ExecProcessRequest>(serde_json::json!({"process": {"terminl": true}}))
            .unwrap_err();
        assert!(
            e.contains("process.terminl") && e.contains("oci_process_json"),
            "{e}"
        );

        let e = decode::<CreateContainerRequest>(
            serde_json::json!({"container_id": "c", "storages": [{}, {"fstype": 3}]}),
        )
        .unwrap_err();
        assert!(
            e.starts_with("field storages[1].fstype: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn process_list_as_text() {
        let v = tidy_reply(
            "ListProcesses",
            serde_json::json!({"process_list": [80, 73, 68, 10], "pids": [1]}),
        );
        assert_eq!(v["process_list"], "PID\n");
        assert_eq!(
            tidy_reply("StartContainer", Value::Null),
            serde_json::json!({})
        );
    }
}
