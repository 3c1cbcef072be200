//! The shim's model of a pod's containers and processes.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex as StdMutex};

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::TtrpcResult;
use tokio::sync::{watch, Mutex};

use crate::error::{err, Code};
use crate::io::{Copies, Paths};
use crate::pod::Pod;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PState {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone)]
pub(super) struct Exit {
    pub(super) status: u32,
    pub(super) at: Timestamp,
}

pub(super) struct Proc {
    pub(super) cid: String,
    pub(super) exec_id: String,
    pub(super) io: Paths,
    pub(super) process_json: String,
    pub(super) state: StdMutex<PState>,
    pub(super) exit: watch::Sender<Option<Exit>>,
    pub(super) copies: Mutex<Option<Copies>>,
}

impl Proc {
    pub(super) fn new(cid: &str, exec_id: &str, io: Paths, process_json: String) -> Arc<Proc> {
        Arc::new(Proc {
            cid: cid.into(),
            exec_id: exec_id.into(),
            io,
            process_json,
            state: StdMutex::new(PState::Created),
            exit: watch::channel(None).0,
            copies: Mutex::new(None),
        })
    }

    pub(super) fn state(&self) -> PState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_state(&self, s: PState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub(super) fn exit_info(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }
}

pub(super) struct Ctr {
    pub(super) id: String,
    pub(super) bundle: String,
    pub(super) owner: bool,
    pub(super) init: Arc<Proc>,
    pub(super) execs: StdMutex<HashMap<String, Arc<Proc>>>,
    pub(super) paused: AtomicBool,
}

impl Ctr {
    pub(super) fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of container {} does not exist", self.id),
                )
            })
    }
}

pub(super) struct Inner {
    pub(super) namespace: String,
    pub(super) events: super::Events,
    pub(super) source: super::PodSource,
    pub(super) exit: Arc<ExitSignal>,
    pub(super) pod: Mutex<Option<Arc<Pod>>>,
    pub(super) destroying: AtomicBool,
    pub(super) containers: StdMutex<HashMap<String, Arc<Ctr>>>,
    /// The root span of each container's trace (Create to Delete), while
    /// tracing is on.
    pub(super) traces: StdMutex<HashMap<String, tracing::Span>>,
}

/// Now, as containerd's timestamps.
pub(super) fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}
