//! The span stream from the guest agent to kata-trace-forwarder
//! (protos/trace.proto): framing, the checks a receiver applies to what a
//! hostile guest may send, and the JSON line form of a span.

use std::collections::BTreeMap;

use prost::Message;
use serde::{Deserialize, Serialize};

pub use crate::tracepb::{attribute, frame, Attribute, Clock, Dropped, Event, Frame, Hello, Span};

/// The schema version this build speaks.
pub const VERSION: u8 = 1;
/// The first bytes of a stream: `KTRACE`, a zero byte, the version.
pub const PREAMBLE: [u8; 8] = [b'K', b'T', b'R', b'A', b'C', b'E', 0, VERSION];
/// The largest frame (length prefix excluded).
pub const MAX_FRAME: usize = 64 << 10;
/// The longest span or event name, in bytes.
pub const MAX_NAME: usize = 256;
/// Most attributes of a span or event.
pub const MAX_ATTRIBUTES: usize = 128;
/// Most events of a span.
pub const MAX_EVENTS: usize = 128;
/// The longest string attribute a sender keeps (longer ones are cut).
pub const MAX_VALUE: usize = 2048;

/// Why a stream was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    /// Not a kata-rs span stream.
    #[error("not a kata-rs span stream (bad preamble)")]
    Preamble,
    /// Another schema version.
    #[error("span stream version {0}, this build speaks {VERSION}")]
    Version(u8),
    /// A frame above [`MAX_FRAME`].
    #[error("frame of {0} bytes (the limit is {MAX_FRAME})")]
    TooLarge(usize),
    /// Bytes that are not a `Frame`.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A frame that breaks the schema's rules.
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

/// Appends `frame`, length-prefixed, to `out`; an error if it is too large.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    let len = frame.encoded_len();
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    frame
        .encode(out)
        .map_err(|e| WireError::Decode(e.to_string()))
}

/// The checks of a span from an untrusted sender.
pub fn check_span(s: &Span) -> Result<(), WireError> {
    let bad = |what| Err(WireError::Invalid(what));
    if s.trace_id.len() != 16 || s.trace_id.iter().all(|b| *b == 0) {
        return bad("trace_id must be 16 bytes, not all zero");
    }
    if s.span_id.len() != 8 || s.span_id.iter().all(|b| *b == 0) {
        return bad("span_id must be 8 bytes, not all zero");
    }
    if !(s.parent_span_id.is_empty() || s.parent_span_id.len() == 8) {
        return bad("parent_span_id must be empty or 8 bytes");
    }
    if s.name.is_empty() || s.name.len() > MAX_NAME {
        return bad("name must be 1 to 256 bytes");
    }
    if s.end_unix_nano < s.start_unix_nano {
        return bad("span ends before it starts");
    }
    if s.kind > 5 || s.status_code > 2 {
        return bad("unknown kind or status code");
    }
    if s.attributes.len() > MAX_ATTRIBUTES || s.events.len() > MAX_EVENTS {
        return bad("too many attributes or events");
    }
    if s.service.len() > MAX_NAME {
        return bad("service name too long");
    }
    for e in &s.events {
        if e.name.len() > MAX_NAME || e.attributes.len() > MAX_ATTRIBUTES {
            return bad("event name too long or too many event attributes");
        }
    }
    Ok(())
}

fn check_frame(f: &Frame) -> Result<(), WireError> {
    match &f.body {
        Some(frame::Body::Span(s)) => check_span(s),
        Some(frame::Body::Hello(h)) if h.service.len() > MAX_NAME || h.version.len() > MAX_NAME => {
            Err(WireError::Invalid("hello fields too long"))
        }
        Some(_) => Ok(()),
        None => Err(WireError::Invalid("empty frame")),
    }
}

/// Incremental decoder of one stream: [`feed`](Decoder::feed) bytes as they
/// come, take frames with [`next_frame`](Decoder::next_frame). It holds at most
/// one frame's bytes beyond what was fed last; any error is final (the
/// receiver closes the stream).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    preamble: bool,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `None` until enough bytes came.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if !self.preamble {
            let n = self.buf.len().min(PREAMBLE.len());
            if self.buf[..n] != PREAMBLE[..n] {
                if n == PREAMBLE.len() && self.buf[..7] == PREAMBLE[..7] {
                    return Err(WireError::Version(self.buf[7]));
                }
                return Err(WireError::Preamble);
            }
            if n < PREAMBLE.len() {
                return Ok(None);
            }
            self.buf.drain(..PREAMBLE.len());
            self.preamble = true;
        }
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame =
            Frame::decode(&self.buf[4..4 + len]).map_err(|e| WireError::Decode(e.to_string()))?;
        self.buf.drain(..4 + len);
        check_frame(&frame)?;
        Ok(Some(frame))
    }
}

/// Every frame of a whole stream (the fuzz target's entry).
pub fn decode_stream(data: &[u8]) -> Result<Vec<Frame>, WireError> {
    let mut d = Decoder::new();
    d.feed(data);
    let mut out = Vec::new();
    while let Some(f) = d.next_frame()? {
        out.push(f);
    }
    Ok(out)
}

/// Moves every time of `s` by `offset_ns` (the receiver's clock minus the
/// sender's), saturating at the ends of the range.
pub fn shift(s: &mut Span, offset_ns: i64) {
    let mv = |t: u64| -> u64 {
        if offset_ns >= 0 {
            t.saturating_add(offset_ns as u64)
        } else {
            t.saturating_sub(offset_ns.unsigned_abs())
        }
    };
    s.start_unix_nano = mv(s.start_unix_nano);
    s.end_unix_nano = mv(s.end_unix_nano);
    for e in &mut s.events {
        e.time_unix_nano = mv(e.time_unix_nano);
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A span as one JSON line: what `kata-trace-forwarder --dump-only` writes
/// and `kata-ctl trace report` reads. Ids are lower-case hex.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, empty for a root span.
    pub parent_span_id: String,
    /// The parent came from another program.
    pub parent_is_remote: bool,
    /// The span's name.
    pub name: String,
    /// The program (service.name).
    pub service: String,
    /// The pod, when the writer knows it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sandbox_id: String,
    /// OpenTelemetry's SpanKind number.
    pub kind: u32,
    /// Unix nanoseconds.
    pub start_unix_nano: u64,
    /// Unix nanoseconds.
    pub end_unix_nano: u64,
    /// Attributes by key.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: u32,
    /// The error's message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status_message: String,
    /// Log lines recorded in the span.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRecord>,
}

/// An event of a [`Record`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventRecord {
    /// The event's name (its message).
    pub name: String,
    /// Unix nanoseconds.
    pub time_unix_nano: u64,
    /// Attributes by key.
    pub attributes: BTreeMap<String, serde_json::Value>,
}

/// Lower-case hex of `b` (the JSON form of ids).
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str, len: usize) -> Result<Vec<u8>, String> {
    if s.len() != 2 * len || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not {} hex digits", 2 * len));
    }
    (0..len)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn attrs_json(a: &[Attribute]) -> BTreeMap<String, serde_json::Value> {
    a.iter()
        .map(|kv| {
            let v = match &kv.value {
                Some(attribute::Value::StringValue(s)) => s.clone().into(),
                Some(attribute::Value::IntValue(i)) => (*i).into(),
                Some(attribute::Value::DoubleValue(d)) => (*d).into(),
                Some(attribute::Value::BoolValue(b)) => (*b).into(),
                None => serde_json::Value::Null,
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn attrs_wire(a: &BTreeMap<String, serde_json::Value>) -> Vec<Attribute> {
    a.iter()
        .map(|(k, v)| Attribute {
            key: k.clone(),
            value: match v {
                serde_json::Value::Bool(b) => Some(attribute::Value::BoolValue(*b)),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Some(attribute::Value::IntValue(i)),
                    None => n.as_f64().map(attribute::Value::DoubleValue),
                },
                serde_json::Value::String(s) => Some(attribute::Value::StringValue(s.clone())),
                serde_json::Value::Null => None,
                other => Some(attribute::Value::StringValue(other.to_string())),
            },
        })
        .collect()
}

impl Record {
    /// The JSON form of `s`, `sandbox_id` added when known.
    pub fn of(s: &Span, sandbox_id: &str) -> Record {
        Record {
            trace_id: hex(&s.trace_id),
            span_id: hex(&s.span_id),
            parent_span_id: hex(&s.parent_span_id),
            parent_is_remote: s.parent_is_remote,
            name: s.name.clone(),
            service: s.service.clone(),
            sandbox_id: sandbox_id.into(),
            kind: s.kind,
            start_unix_nano: s.start_unix_nano,
            end_unix_nano: s.end_unix_nano,
            attributes: attrs_json(&s.attributes),
            status_code: s.status_code,
            status_message: s.status_message.clone(),
            events: s
                .events
                .iter()
                .map(|e| EventRecord {
                    name: e.name.clone(),
                    time_unix_nano: e.time_unix_nano,
                    attributes: attrs_json(&e.attributes),
                })
                .collect(),
        }
    }

    /// Back to the wire form; an error naming the bad field.
    pub fn to_span(&self) -> Result<Span, String> {
        Ok(Span {
            trace_id: unhex(&self.trace_id, 16).map_err(|e| format!("trace_id: {e}"))?,
            span_id: unhex(&self.span_id, 8).map_err(|e| format!("span_id: {e}"))?,
            parent_span_id: if self.parent_span_id.is_empty() {
                Vec::new()
            } else {
                unhex(&self.parent_span_id, 8).map_err(|e| format!("parent_span_id: {e}"))?
            },
            parent_is_remote: self.parent_is_remote,
            name: self.name.clone(),
            kind: self.kind,
            start_unix_nano: self.start_unix_nano,
            end_unix_nano: self.end_unix_nano,
            attributes: attrs_wire(&self.attributes),
            status_code: self.status_code,
            status_message: self.status_message.clone(),
            events: self
                .events
                .iter()
                .map(|e| Event {
                    name: e.name.clone(),
                    time_unix_nano: e.time_unix_nano,
                    attributes: attrs_wire(&e.attributes),
                })
                .collect(),
            service: self.service.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: name.into(),
            kind: 2,
            start_unix_nano: 10,
            end_unix_nano: 20,
            attributes: vec![Attribute {
                key: "k".into(),
                value: Some(attribute::Value::IntValue(7)),
            }],
            service: "kata-agent".into(),
            ..Default::default()
        }
    }

    fn stream(frames: &[Frame]) -> Vec<u8> {
        let mut out = PREAMBLE.to_vec();
        for f in frames {
            encode_frame(f, &mut out).unwrap();
        }
        out
    }

    fn span_frame(s: Span) -> Frame {
        Frame {
            body: Some(frame::Body::Span(s)),
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let frames = vec![
            Frame {
                body: Some(frame::Body::Hello(Hello {
                    service: "kata-agent".into(),
                    version: "1".into(),
                })),
            },
            span_frame(span("CreateContainer")),
            Frame {
                body: Some(frame::Body::Dropped(Dropped { count: 3 })),
            },
        ];
        let bytes = stream(&frames);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.feed(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn refuses_what_a_hostile_guest_may_send() {
        assert_eq!(
            decode_stream(b"GET / HTTP/1.1\r\n"),
            Err(WireError::Preamble)
        );
        let mut v2 = PREAMBLE.to_vec();
        v2[7] = 2;
        assert_eq!(decode_stream(&v2), Err(WireError::Version(2)));
        let mut big = PREAMBLE.to_vec();
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode_stream(&big),
            Err(WireError::TooLarge(u32::MAX as usize))
        );
        let mut junk = PREAMBLE.to_vec();
        junk.extend_from_slice(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(decode_stream(&junk), Err(WireError::Decode(_))));
        let mut s = span("x");
        s.trace_id = vec![0; 16];
        assert!(matches!(
            decode_stream(&stream(&[span_frame(s)])),
            Err(WireError::Invalid(_))
        ));
        let mut s = span("x");
        s.end_unix_nano = 1;
        assert!(decode_stream(&stream(&[span_frame(s)])).is_err());
        let s = span(&"n".repeat(MAX_NAME + 1));
        assert!(decode_stream(&stream(&[span_frame(s)])).is_err());
        assert!(decode_stream(&stream(&[Frame { body: None }])).is_err());
        // a partial frame is not an error, only not yet a frame
        let whole = stream(&[span_frame(span("x"))]);
        assert_eq!(decode_stream(&whole[..whole.len() - 1]), Ok(vec![]));
    }

    #[test]
    fn oversized_frames_are_not_sent() {
        let mut s = span("x");
        s.status_message = "m".repeat(MAX_FRAME);
        let mut out = Vec::new();
        assert!(matches!(
            encode_frame(&span_frame(s), &mut out),
            Err(WireError::TooLarge(_))
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn json_record_round_trip() {
        let s = span("StartContainer");
        let r = Record::of(&s, "pod1");
        assert_eq!(r.trace_id, "01".repeat(16));
        assert_eq!(r.parent_span_id, "03".repeat(8));
        let line = serde_json::to_string(&r).unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.to_span().unwrap(), s);
        let mut bad = back.clone();
        bad.span_id = "zz".into();
        assert!(bad.to_span().unwrap_err().contains("span_id"));
        assert_eq!(truncate("héllo".into(), 2), "h");
    }
}
