//! Spans to and from OTLP (OpenTelemetry's protocol, the protobuf messages
//! and gRPC client of the `opentelemetry-proto` crate), and the one OTLP/gRPC
//! exporter every kata-rs host program and kata-trace-forwarder use.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as otlp;
use tonic::transport::{Channel, Endpoint};

use super::wire::{attribute, Attribute, Event, Record, Span};

/// The endpoint when the configuration names none: an OTLP/gRPC receiver
/// on this host (Jaeger >= 1.35, the OpenTelemetry Collector, Tempo).
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4317";

/// How long one export may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The resource attribute naming the pod on every exported span.
pub const SANDBOX_ATTRIBUTE: &str = "kata.sandbox_id";

fn any(v: &attribute::Value) -> AnyValue {
    AnyValue {
        value: Some(match v {
            attribute::Value::StringValue(s) => any_value::Value::StringValue(s.clone()),
            attribute::Value::IntValue(i) => any_value::Value::IntValue(*i),
            attribute::Value::DoubleValue(d) => any_value::Value::DoubleValue(*d),
            attribute::Value::BoolValue(b) => any_value::Value::BoolValue(*b),
        }),
    }
}

fn kv(a: &[Attribute]) -> Vec<KeyValue> {
    a.iter()
        .map(|a| KeyValue {
            key: a.key.clone(),
            value: a.value.as_ref().map(any),
            ..Default::default()
        })
        .collect()
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn from_any(v: &AnyValue) -> Option<attribute::Value> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => attribute::Value::StringValue(s.clone()),
        any_value::Value::IntValue(i) => attribute::Value::IntValue(*i),
        any_value::Value::DoubleValue(d) => attribute::Value::DoubleValue(*d),
        any_value::Value::BoolValue(b) => attribute::Value::BoolValue(*b),
        other => attribute::Value::StringValue(format!("{other:?}")),
    })
}

fn from_kv(a: &[KeyValue]) -> Vec<Attribute> {
    a.iter()
        .map(|a| Attribute {
            key: a.key.clone(),
            value: a.value.as_ref().and_then(from_any),
        })
        .collect()
}

/// A span in OTLP's form.
pub fn to_otlp(s: &Span) -> otlp::Span {
    otlp::Span {
        trace_id: s.trace_id.clone(),
        span_id: s.span_id.clone(),
        parent_span_id: s.parent_span_id.clone(),
        // bit 8: the parent's remoteness is known; bit 9: it is remote
        flags: 0x100 | if s.parent_is_remote { 0x200 } else { 0 },
        name: s.name.clone(),
        kind: s.kind as i32,
        start_time_unix_nano: s.start_unix_nano,
        end_time_unix_nano: s.end_unix_nano,
        attributes: kv(&s.attributes),
        events: s
            .events
            .iter()
            .map(|e| otlp::span::Event {
                time_unix_nano: e.time_unix_nano,
                name: e.name.clone(),
                attributes: kv(&e.attributes),
                ..Default::default()
            })
            .collect(),
        status: (s.status_code != 0).then(|| otlp::Status {
            message: s.status_message.clone(),
            code: s.status_code as i32,
        }),
        ..Default::default()
    }
}

/// One export request: the spans grouped by their program, each group a
/// resource with `service.name` (and the pod's id when known).
pub fn request(spans: &[Span], sandbox_id: &str) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<&str, Vec<otlp::Span>> = BTreeMap::new();
    for s in spans {
        by_service.entry(&s.service).or_default().push(to_otlp(s));
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| {
                let mut attributes = vec![
                    string_kv("service.name", service),
                    string_kv("service.version", crate::VERSION),
                ];
                if !sandbox_id.is_empty() {
                    attributes.push(string_kv(SANDBOX_ATTRIBUTE, sandbox_id));
                }
                otlp::ResourceSpans {
                    resource: Some(Resource {
                        attributes,
                        ..Default::default()
                    }),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "kata-rs".into(),
                            version: crate::VERSION.into(),
                            ..Default::default()
                        }),
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect(),
    }
}

/// The spans of an export request as JSON records (what a receiver stores
/// for `kata-ctl trace report`).
pub fn records(req: &ExportTraceServiceRequest) -> Vec<Record> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let attr = |key: &str| {
            rs.resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == key))
                .and_then(|a| a.value.as_ref())
                .and_then(from_any)
                .map(|v| match v {
                    attribute::Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default()
        };
        let service = attr("service.name");
        let sandbox = attr(SANDBOX_ATTRIBUTE);
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                let span = Span {
                    trace_id: s.trace_id.clone(),
                    span_id: s.span_id.clone(),
                    parent_span_id: s.parent_span_id.clone(),
                    parent_is_remote: s.flags & 0x200 != 0,
                    name: s.name.clone(),
                    kind: s.kind.max(0) as u32,
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    attributes: from_kv(&s.attributes),
                    status_code: s
                        .status
                        .as_ref()
                        .map(|st| st.code.max(0) as u32)
                        .unwrap_or(0),
                    status_message: s
                        .status
                        .as_ref()
                        .map(|st| st.message.clone())
                        .unwrap_or_default(),
                    events: s
                        .events
                        .iter()
                        .map(|e| Event {
                            name: e.name.clone(),
                            time_unix_nano: e.time_unix_nano,
                            attributes: from_kv(&e.attributes),
                        })
                        .collect(),
                    service: service.clone(),
                };
                out.push(Record::of(&span, &sandbox));
            }
        }
    }
    out
}

/// An OTLP/gRPC exporter: connects on first use and again after a failure.
#[derive(Debug)]
pub struct Exporter {
    endpoint: String,
    authorization: Option<String>,
    client: Option<TraceServiceClient<Channel>>,
}

impl Exporter {
    /// An exporter to `endpoint` (`http://host:port`); with `basic_auth`, an
    /// `authorization: Basic ...` header on every export (Kata's
    /// `jaeger_user`/`jaeger_password`).
    pub fn new(endpoint: &str, basic_auth: Option<(&str, &str)>) -> Result<Self, String> {
        use base64::Engine as _;
        Endpoint::from_shared(endpoint.to_string()).map_err(|e| {
            format!("OTLP endpoint {endpoint:?}: {e} (expected e.g. {DEFAULT_ENDPOINT})")
        })?;
        Ok(Self {
            endpoint: endpoint.into(),
            authorization: basic_auth.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
            client: None,
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends `spans` (one request), within [`EXPORT_TIMEOUT`].
    pub async fn export(&mut self, spans: &[Span], sandbox_id: &str) -> Result<(), String> {
        if spans.is_empty() {
            return Ok(());
        }
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, async {
            let client = match &mut self.client {
                Some(c) => c,
                None => {
                    let ch = Endpoint::from_shared(self.endpoint.clone())
                        .map_err(|e| e.to_string())?
                        .connect_timeout(Duration::from_secs(2))
                        .connect()
                        .await
                        .map_err(|e| format!("connecting: {e}"))?;
                    self.client.insert(TraceServiceClient::new(ch))
                }
            };
            let mut req = tonic::Request::new(request(spans, sandbox_id));
            if let Some(a) = &self.authorization {
                if let Ok(v) = a.parse() {
                    req.metadata_mut().insert("authorization", v);
                }
            }
            client
                .export(req)
                .await
                .map(|_| ())
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {EXPORT_TIMEOUT:?}")));
        if sent.is_err() {
            self.client = None;
        }
        sent.map_err(|e| format!("OTLP export to {}: {e}", self.endpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_round_trip_keeps_the_span() {
        let s = Span {
            trace_id: vec![9; 16],
            span_id: vec![8; 8],
            parent_span_id: vec![7; 8],
            parent_is_remote: true,
            name: "CreateContainer".into(),
            kind: 2,
            start_unix_nano: 5,
            end_unix_nano: 6,
            attributes: vec![Attribute {
                key: "container_id".into(),
                value: Some(attribute::Value::StringValue("c1".into())),
            }],
            status_code: 2,
            status_message: "failed".into(),
            events: vec![Event {
                name: "line".into(),
                time_unix_nano: 5,
                attributes: vec![],
            }],
            service: "kata-agent".into(),
        };
        let req = request(std::slice::from_ref(&s), "pod1");
        let recs = records(&req);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].sandbox_id, "pod1");
        assert_eq!(recs[0].to_span().unwrap(), s);
        assert!(Exporter::new("not a url", None).is_err());
    }
}
