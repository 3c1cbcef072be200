//! The agent's side of the agent policy (Kata's `agent-policy`): the policy
//! in force, the input each request gives it, `SetPolicy`, and the policy
//! debug log. The decisions themselves are `kata_agent_policy`'s.
//!
//! Built without the `agent-policy` feature, the gate allows everything and
//! costs nothing (no request is serialized), and `SetPolicy` is refused.
//!
//! Built with it, the agent reads its policy at start-up (in the guest
//! [`DEFAULT_POLICY_FILE`], from the image). A missing or unparsable file
//! does not open the agent: every request is then refused with a message
//! naming the file. Every AgentService request is checked before it acts, and
//! so is the attachment of a stdio stream (`ReadStreamRequest` for an output,
//! `WriteStreamRequest` for stdin). Health calls carry no data and are not
//! checked, as in Kata.

#[cfg(not(feature = "agent-policy"))]
use serde::Serialize;
#[cfg(not(feature = "agent-policy"))]
use tonic::Status;

/// Kata's path of the default policy in the guest image.
pub const DEFAULT_POLICY_FILE: &str = "/etc/kata-opa/default-policy.rego";

#[cfg(feature = "agent-policy")]
pub use imp::Gate;

#[cfg(not(feature = "agent-policy"))]
/// The policy gate of an agent built without policy support: allows all.
#[derive(Debug, Default)]
pub struct Gate;

#[cfg(not(feature = "agent-policy"))]
impl Gate {
    /// Checks a request: always allowed.
    #[inline]
    pub fn check<T: Serialize>(&self, _request: &str, _req: &T) -> Result<(), Status> {
        Ok(())
    }

    /// `SetPolicy`: refused, naming the build switch.
    pub fn set_policy(&self, _policy: &str) -> Result<(), Status> {
        Err(Status::unimplemented(
            "SetPolicy: this agent was built without policy support \
             (Kata's AGENT_POLICY: build the agent with --features agent-policy)",
        ))
    }
}

#[cfg(feature = "agent-policy")]
mod imp {
    use std::io::Write as _;
    use std::path::Path;
    use std::sync::Mutex;

    use base64::Engine as _;
    use kata_agent_policy::{LogRecord, Policy, PolicyError};
    use serde::Serialize;
    use serde_json::Value;
    use tonic::Status;
    use tracing::{error, info};

    use crate::container;

    enum State {
        Loaded(Box<Policy>),
        /// No usable policy: every request is refused with this reason.
        Broken(String),
    }

    /// The policy in force.
    pub struct Gate {
        state: Mutex<State>,
        debug: bool,
    }

    impl std::fmt::Debug for Gate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Gate").field("debug", &self.debug).finish()
        }
    }

    impl Gate {
        /// The policy of the file `path`; `debug` logs every checked request
        /// on stderr (the guest's console) as a [`LogRecord`] line.
        pub fn load(path: &Path, debug: bool) -> Gate {
            let state = match Policy::from_file(path) {
                Ok(p) => State::Loaded(Box::new(p)),
                Err(e) => {
                    error!("{e}: every request will be refused");
                    State::Broken(format!("{e}"))
                }
            };
            Gate {
                state: Mutex::new(state),
                debug,
            }
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Checks `req` as the request `request` (its message name).
        pub fn check<T: Serialize>(&self, request: &str, req: &T) -> Result<(), Status> {
            let input = input(req)?;
            self.decide(request, input)
        }

        fn decide(&self, request: &str, input: Value) -> Result<(), Status> {
            let decision = match &mut *self.lock() {
                State::Loaded(p) => p.check(request, &input.to_string()),
                State::Broken(why) => Err(format!(
                    "{request} is blocked by policy: the agent has no usable policy ({why})"
                )),
            };
            if self.debug {
                let line = LogRecord {
                    request: request.into(),
                    input,
                    allowed: decision.is_ok(),
                }
                .to_line();
                // one write per line, so lines do not mix on the console
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            decision.map_err(Status::permission_denied)
        }

        /// `SetPolicy`: allowed only by the policy in force; the new policy
        /// replaces it only once it parsed (else the old one stays).
        pub fn set_policy(&self, text: &str) -> Result<(), Status> {
            self.check(
                "SetPolicyRequest",
                &kata_proto::agent::SetPolicyRequest {
                    policy: text.into(),
                },
            )?;
            let new = Policy::from_text("the policy of SetPolicy", text).map_err(|e| match e {
                PolicyError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
            *self.lock() = State::Loaded(Box::new(new));
            info!("SetPolicy: a new agent policy is in force");
            Ok(())
        }
    }

    /// The policy's input for a request: its JSON with the protobuf field
    /// names, where the OCI JSON texts our messages carry are given as the
    /// objects they hold, parsed as the agent parses them (so the policy
    /// judges what the agent will do): `oci_spec_json` becomes `OCI` (Kata's
    /// name), `process.oci_process_json` becomes `process` itself,
    /// `resources.oci_resources_json` becomes `resources`. Bytes are base64,
    /// as in protobuf's JSON mapping.
    pub fn input<T: Serialize>(req: &T) -> Result<Value, Status> {
        let mut v = serde_json::to_value(req)
            .map_err(|e| Status::internal(format!("the request as JSON: {e}")))?;
        let Some(o) = v.as_object_mut() else {
            return Ok(v);
        };
        if let Some(Value::String(json)) = o.remove("oci_spec_json") {
            let spec = container::parse_spec(&json)?;
            o.insert("OCI".into(), to_value(&spec)?);
        }
        if let Some(p) = o.get_mut("process") {
            if let Some(Value::String(json)) = p.get("oci_process_json") {
                let mut process: oci_spec::runtime::Process =
                    serde_json::from_str(json).map_err(|e| {
                        Status::invalid_argument(format!("process does not parse: {e}"))
                    })?;
                if p.get("terminal") == Some(&Value::Bool(true)) {
                    process.set_terminal(Some(true));
                }
                *p = to_value(&process)?;
            }
        }
        if let Some(r) = o.get_mut("resources") {
            if let Some(Value::String(json)) = r.get("oci_resources_json") {
                let res: oci_spec::runtime::LinuxResources =
                    serde_json::from_str(json).map_err(|e| {
                        Status::invalid_argument(format!("resources do not parse: {e}"))
                    })?;
                *r = to_value(&res)?;
            }
        }
        if let Some(d) = o.get_mut("data") {
            if let Value::Array(a) = d {
                let bytes: Vec<u8> = a
                    .iter()
                    .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect();
                *d = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
        }
        Ok(v)
    }

    fn to_value<T: Serialize>(t: &T) -> Result<Value, Status> {
        serde_json::to_value(t).map_err(|e| Status::internal(format!("the request as JSON: {e}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use kata_proto::agent::*;

        #[test]
        fn inputs_hold_the_parsed_oci_objects() {
            let req = ExecProcessRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                process: Some(kata_proto::agent::Process {
                    oci_process_json: r#"{"args":["/bin/ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#
                        .into(),
                    terminal: true,
                }),
                ..Default::default()
            };
            let v = input(&req).unwrap();
            assert_eq!(v["process"]["args"][0], "/bin/ls");
            assert_eq!(v["process"]["terminal"], true);
            assert_eq!(v["container_id"], "c1");
            let bad = ExecProcessRequest {
                process: Some(kata_proto::agent::Process {
                    oci_process_json: "{".into(),
                    terminal: false,
                }),
                ..Default::default()
            };
            assert_eq!(
                input(&bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
            let copy = CopyFileRequest {
                path: "/x".into(),
                data: b"hi".to_vec(),
                ..Default::default()
            };
            assert_eq!(input(&copy).unwrap()["data"], "aGk=");
        }

        #[test]
        fn a_missing_policy_refuses_everything_naming_the_file() {
            let g = Gate::load(Path::new("/nonexistent/default-policy.rego"), false);
            let e = g
                .check("ListRoutesRequest", &ListRoutesRequest {})
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(
                e.message()
                    .contains("ListRoutesRequest is blocked by policy"),
                "{e}"
            );
            assert!(
                e.message().contains("/nonexistent/default-policy.rego"),
                "{e}"
            );
        }

        #[test]
        fn set_policy_is_checked_and_keeps_the_old_policy_on_errors() {
            let d = tempfile::tempdir().unwrap();
            let f = d.path().join("p.rego");
            std::fs::write(&f, kata_agent_policy::ALLOW_ALL).unwrap();
            let g = Gate::load(&f, false);
            let e = g.set_policy("package agent_policy\nx := \n").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            g.check("ListRoutesRequest", &ListRoutesRequest {}).unwrap();
            let big = "#".repeat(kata_agent_policy::MAX_POLICY_BYTES + 1);
            let e = g.set_policy(&big).unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted);
            assert!(e.message().contains("limit"), "{e}");
            g.set_policy("package agent_policy\ndefault ListRoutesRequest := true\n")
                .unwrap();
            // the new policy has no SetPolicyRequest rule: a second one is refused
            let e = g.set_policy(kata_agent_policy::ALLOW_ALL).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e
                .message()
                .contains("SetPolicyRequest is blocked by policy"));
            g.check("ListRoutesRequest", &ListRoutesRequest {}).unwrap();
        }
    }
}
