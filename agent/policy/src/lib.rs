//! Agent policy (Kata's `agent-policy`): every request the agent gets is
//! checked, in the guest, against a Rego policy evaluated in process with
//! regorus. The host cannot change the policy behind the guest's back: the
//! default policy comes with the guest image, and only `SetPolicy` (itself
//! checked by the policy in force) replaces it.
//!
//! A request is the JSON of its protobuf message (field names as in the
//! .proto); the query is `data.agent_policy.<RequestName>`. Its result is a
//! bool, or an object `{"allowed": bool, "ops": [JSON patch]}` whose `ops`
//! update the policy's data (genpolicy's policies remember containers that
//! way). An undefined result is a denial, unless the policy's
//! `AllowRequestsFailingPolicy` is true (a policy being written, Kata's
//! escape hatch): the denial is then logged and the request goes on.

use core::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;

use serde::{Deserialize, Serialize};

use regorus::utils::limits::PolicyLengthConfig;
use regorus::{Engine, Value};
use tracing::{info, warn};

/// Kata's path of the default policy in the guest image.
pub const DEFAULT_POLICY_FILE: &str = "/etc/kata-opa/default-policy.rego";

/// The allow-all policy a guest image carries by default (a rule for every
/// agent request, each `true`).
pub const ALLOW_ALL: &str = include_str!("../allow-all.rego");

/// What starts a policy debug line on the agent's console: the rest of the
/// line is one [`LogRecord`] as JSON.
pub const LOG_MARKER: &str = "kata-agent-policy ";

/// Limits of a policy's text. regorus's defaults (1 MiB, 20 000 lines, 1024
/// columns) refuse what genpolicy writes (its `policy_data` is long JSON
/// lines; Kata pins a regorus revision for that), so the crates.io release
/// is configured with these.
pub const MAX_POLICY_BYTES: usize = 8 << 20;
const MAX_POLICY_LINES: usize = 500_000;
const MAX_POLICY_COLUMNS: u32 = 4 << 20;

/// Why a policy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading the policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The text is longer than [`MAX_POLICY_BYTES`].
    #[error("the policy {name} is {len} bytes: the limit is {MAX_POLICY_BYTES} bytes (8 MiB)")]
    TooLarge {
        /// Where it came from.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The text is not a policy regorus accepts.
    #[error("the policy {name} does not parse: {why}")]
    Parse {
        /// Where it came from.
        name: String,
        /// regorus's message.
        why: String,
    },
}

/// One checked request, as the policy debug log records it and
/// `kata-ctl policy eval` replays it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The request's message name, e.g. `ExecProcessRequest`.
    pub request: String,
    /// The policy's input: the request as JSON.
    pub input: serde_json::Value,
    /// Whether the agent went on with the request.
    pub allowed: bool,
}

impl LogRecord {
    /// The record as one console line (marker, JSON, newline).
    pub fn to_line(&self) -> String {
        format!(
            "{LOG_MARKER}{}\n",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// The record in a line of a console log, if it holds one (anything
    /// before the marker, e.g. a kernel message's tail, is skipped).
    pub fn from_line(line: &str) -> Option<LogRecord> {
        let (_, json) = line.split_once(LOG_MARKER)?;
        serde_json::from_str(json.trim_end()).ok()
    }
}

/// A loaded policy and its state.
pub struct Policy {
    engine: Engine,
    name: String,
    allow_failures: bool,
}

impl Policy {
    /// Loads the policy file at `path`.
    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::from_text(&path.display().to_string(), &text)
    }

    /// Loads the policy `text` (named `name` in messages).
    pub fn from_text(name: &str, text: &str) -> Result<Policy, PolicyError> {
        let parse = |e: anyhow::Error| PolicyError::Parse {
            name: name.into(),
            why: format!("{e:#}"),
        };
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                name: name.into(),
                len: text.len(),
            });
        }
        let mut engine = Engine::new();
        engine.set_policy_length_config(PolicyLengthConfig {
            max_col: NonZeroU32::new(MAX_POLICY_COLUMNS).unwrap_or(NonZeroU32::MIN),
            max_file_bytes: NonZeroUsize::new(MAX_POLICY_BYTES).unwrap_or(NonZeroUsize::MIN),
            max_lines: NonZeroUsize::new(MAX_POLICY_LINES).unwrap_or(NonZeroUsize::MIN),
        });
        engine.set_rego_v0(true);
        engine.add_policy(name.into(), text.into()).map_err(parse)?;
        let allow_failures = matches!(
            engine.eval_rule("data.agent_policy.AllowRequestsFailingPolicy".into()),
            Ok(Value::Bool(true))
        );
        if allow_failures {
            warn!(
                policy = name,
                "AllowRequestsFailingPolicy: denials are logged, not enforced"
            );
        }
        info!(policy = name, "agent policy loaded");
        Ok(Policy {
            engine,
            name: name.into(),
            allow_failures,
        })
    }

    /// Checks `request` (its message name, e.g. `ExecProcessRequest`) with
    /// `input` (the message as JSON). `Err` is the denial's message.
    pub fn check(&mut self, request: &str, input: &str) -> Result<(), String> {
        let denied = match self.decide(request, input) {
            Ok(true) => return Ok(()),
            Ok(false) => format!("{request} is blocked by policy"),
            Err(why) => format!("{request} is blocked by policy: {why}"),
        };
        if self.allow_failures {
            warn!(request, "{denied} (allowed: AllowRequestsFailingPolicy)");
            return Ok(());
        }
        Err(denied)
    }

    /// The policy's name (its file, or where its text came from).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn decide(&mut self, request: &str, input: &str) -> Result<bool, String> {
        if !request.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!("{request:?} is no request name"));
        }
        self.engine
            .set_input_json(input)
            .map_err(|e| format!("the request is not JSON: {e}"))?;
        let v = self
            .engine
            .eval_rule(format!("data.agent_policy.{request}"))
            .map_err(|e| format!("evaluating the policy {}: {e:#}", self.name))?;
        match v {
            Value::Bool(b) => Ok(b),
            Value::Undefined => Ok(false),
            Value::Object(ref o) => {
                let allowed = o.get(&Value::from("allowed")).cloned();
                let Some(Value::Bool(allowed)) = allowed else {
                    return Err("the policy's decision has no boolean \"allowed\"".into());
                };
                if allowed {
                    if let Some(ops) = o.get(&Value::from("ops")) {
                        self.apply_ops(ops)?;
                    }
                }
                Ok(allowed)
            }
            other => Err(format!(
                "the policy's decision is neither a boolean nor {{allowed, ops}}: {}",
                other.to_json_str().unwrap_or_default()
            )),
        }
    }

    /// Applies a decision's JSON patch to the policy's data.
    fn apply_ops(&mut self, ops: &Value) -> Result<(), String> {
        let ops = ops.to_json_str().map_err(|e| e.to_string())?;
        let patch: json_patch::Patch =
            serde_json::from_str(&ops).map_err(|e| format!("the decision's ops: {e}"))?;
        let data = self
            .engine
            .get_data()
            .to_json_str()
            .map_err(|e| e.to_string())?;
        let mut data: serde_json::Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
        json_patch::patch(&mut data, &patch).map_err(|e| format!("the decision's ops: {e}"))?;
        self.engine.clear_data();
        self.engine
            .add_data_json(&data.to_string())
            .map_err(|e| format!("the policy's new data: {e}"))
    }
}

/// The RPCs of the agent API's `AgentService`, read from the text of
/// agent.proto: (RPC name, request message name).
pub fn agent_rpcs(agent_proto: &str) -> Vec<(String, String)> {
    agent_proto
        .split("service AgentService")
        .nth(1)
        .and_then(|s| s.split("\n}").next())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("rpc ")?;
            let (name, rest) = l.split_once('(')?;
            Some((
                name.trim().to_string(),
                rest.split_once(')')?.0.trim().to_string(),
            ))
        })
        .collect()
}

/// The request message names of `AgentService` (what a policy has rules
/// for), sorted, each once.
pub fn request_names(agent_proto: &str) -> Vec<String> {
    let mut names: Vec<String> = agent_rpcs(agent_proto)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kata's CI check: the default policy has a rule for every request,
    /// and each allows it.
    #[test]
    fn allow_all_allows_every_request_of_agent_proto() {
        let proto = include_str!("../../../proto/protos/agent.proto");
        let names = request_names(proto);
        assert!(names.len() >= 30, "{names:?}");
        for n in [
            "ExecProcessRequest",
            "SetPolicyRequest",
            "ReadStreamRequest",
            "GetOOMEventRequest",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        let mut p = Policy::from_text("allow-all.rego", ALLOW_ALL).unwrap();
        for n in &names {
            p.check(n, "{}")
                .unwrap_or_else(|e| panic!("allow-all.rego has no rule allowing {n}: {e}"));
            assert!(
                ALLOW_ALL.contains(&format!("default {n} := true")),
                "allow-all.rego states {n}"
            );
        }
    }

    #[test]
    fn log_lines_round_trip_behind_console_noise() {
        let r = LogRecord {
            request: "ExecProcessRequest".into(),
            input: serde_json::json!({"container_id": "c1"}),
            allowed: false,
        };
        let line = r.to_line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(LogRecord::from_line(&format!("[  1.2] x{line}")), Some(r));
        assert_eq!(LogRecord::from_line("kata-agent INFO nothing"), None);
    }

    const POLICY: &str = r#"
package agent_policy

default CreateContainerRequest := false
default ExecProcessRequest := false

CreateContainerRequest := {"allowed": true, "ops": ops} {
    not data.pstate.containers[input.container_id]
    ops := [{"op": "add", "path": "/pstate", "value": {"containers": {input.container_id: true}}}]
}

ExecProcessRequest {
    data.pstate.containers[input.container_id]
    input.process.Args[0] == "/bin/ls"
}

StatsContainerRequest := true
"#;

    #[test]
    fn decisions_state_and_denials() {
        let mut p = Policy::from_text("test.rego", POLICY).unwrap();
        let exec = r#"{"container_id": "c1", "process": {"Args": ["/bin/ls"]}}"#;
        // no container yet: the exec is refused, with Kata's message
        let e = p.check("ExecProcessRequest", exec).unwrap_err();
        assert!(e.contains("ExecProcessRequest is blocked by policy"), "{e}");
        p.check("CreateContainerRequest", r#"{"container_id": "c1"}"#)
            .unwrap();
        // the ops remembered c1
        p.check("ExecProcessRequest", exec).unwrap();
        let sh = r#"{"container_id": "c1", "process": {"Args": ["/bin/sh"]}}"#;
        assert!(p.check("ExecProcessRequest", sh).is_err());
        // a second create of c1 is refused by the state
        assert!(p
            .check("CreateContainerRequest", r#"{"container_id": "c1"}"#)
            .is_err());
        p.check("StatsContainerRequest", "{}").unwrap();
        // a request the policy has no rule for is refused
        let e = p.check("RemoveContainerRequest", "{}").unwrap_err();
        assert!(
            e.contains("RemoveContainerRequest is blocked by policy"),
            "{e}"
        );
        assert!(p.check("data.x", "{}").is_err());
        assert!(p.check("StatsContainerRequest", "not json").is_err());
    }

    #[test]
    fn allow_failures_and_bad_policies() {
        let text = "package agent_policy\ndefault AllowRequestsFailingPolicy := true\n";
        let mut p = Policy::from_text("open.rego", text).unwrap();
        p.check("ExecProcessRequest", "{}").unwrap();
        let e = Policy::from_text("bad.rego", "package agent_policy\nx := \n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("bad.rego"), "{e}");
        let e = Policy::from_file(Path::new("/nonexistent/p.rego"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/p.rego"), "{e}");
        // a long line, as genpolicy writes: past regorus's default 1024 columns
        let long = format!(
            "package agent_policy\npolicy_data := {{\"x\": \"{}\"}}\nStatsContainerRequest := true\n",
            "a".repeat(100_000)
        );
        let mut p = Policy::from_text("long.rego", &long).unwrap();
        p.check("StatsContainerRequest", "{}").unwrap();
    }
}
