//! containerd's task API calls, one method each, over the pod's agent.

use super::*;

/// Ends a task API call: counts it and its time, by method and result code,
/// for the pod's `/metrics` (`kata_shim_task_calls_total`,
/// `kata_shim_task_call_duration_seconds`), and marks its span failed with
/// the error.
fn finish<T>(
    span: &tracing::Span,
    method: &'static str,
    t0: std::time::Instant,
    r: &TtrpcResult<T>,
) {
    let code = match r {
        Ok(_) => "OK".to_string(),
        Err(containerd_shim::protos::ttrpc::Error::RpcStatus(s)) => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", s.message());
            format!("{:?}", s.code())
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", e.to_string());
            "UNKNOWN".to_string()
        }
    };
    crate::monitor::record_call(method, &code, t0.elapsed());
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let t0 = std::time::Instant::now();
        // the spec, and the pod's configuration for the first container,
        // are read before anything else: the configuration says whether
        // this call is traced
        let prepared = self.prepare_create(&req);
        let span = self.container_trace(&req.id);
        let r: TtrpcResult<api::CreateTaskResponse> = async {
            let cid = req.id.clone();
            let Prepared {
                spec,
                joins,
                pod_id,
            } = prepared?;
            // tells `shim delete` which pod to clean if this shim dies
            let _ = std::fs::write(Path::new(&req.bundle).join(SANDBOX_FILE), &pod_id);
            let owner = matches!(joins, Joins::NewPod(_));
            let pod = match joins {
                Joins::NewPod(config) => {
                    let mut slot = self.0.pod.lock().await;
                    if let Some(p) = slot.as_ref() {
                        return Err(err(
                            Code::FAILED_PRECONDITION,
                            format!("this shim already serves pod {}", p.id),
                        ));
                    }
                    let pod = self.create_pod(&cid, &spec, *config).await?;
                    *slot = Some(pod.clone());
                    self.spawn_pod_watch(pod.clone());
                    pod
                }
                Joins::Pod(sandbox_id) => {
                    let pod = self.pod().await?;
                    if pod.id != sandbox_id {
                        return Err(err(
                            Code::NOT_FOUND,
                            format!(
                                "pod {sandbox_id} is not served by this shim (it serves {})",
                                pod.id
                            ),
                        ));
                    }
                    pod
                }
            };
            let terminal = spec
                .process()
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false);
            let io = Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: terminal || req.terminal,
            };
            let init = Proc::new(&cid, "", io, String::new());
            if let Err(e) = self.create_in_pod(&pod, &req, spec, &init).await {
                if owner {
                    self.destroy_pod().await;
                    self.0.destroying.store(false, Ordering::SeqCst);
                }
                return Err(e);
            }
            let ctr = Arc::new(Ctr {
                id: cid.clone(),
                bundle: req.bundle.clone(),
                owner,
                init,
                execs: StdMutex::new(HashMap::new()),
                paused: AtomicBool::new(false),
            });
            self.0
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(cid.clone(), ctr);
            info!(container = %cid, "container created");
            self.publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: cid.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    pid: pod.hypervisor_pid,
                    ..Default::default()
                }),
            )
            .await;
            Ok(api::CreateTaskResponse {
                pid: pod.hypervisor_pid,
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Create", t0, &r);
        if r.is_err() {
            // a failed create ends its container's trace
            self.end_container_trace(&req.id);
        }
        r
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Start", &req.id);
        let r: TtrpcResult<api::StartResponse> = async {
            let c = self.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            let pod = self.pod().await?;
            if p.state() != PState::Created {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("process {} of {} was already started", req.exec_id, req.id),
                ));
            }
            let agent = pod.agent();
            if req.exec_id.is_empty() {
                // what the CNI plugins did after Create reaches the guest first
                if let Err(e) = pod.sync_network().await {
                    warn!("bringing the guest's network up to date before the start: {e}");
                }
                if let Err(e) = agent
                    .start_container(pb::StartContainerRequest {
                        container_id: req.id.clone(),
                    })
                    .await
                {
                    // its init is gone: the task is stopped, Delete works
                    self.exited(&p, 255, pod.hypervisor_pid).await;
                    return Err(e.into());
                }
            } else {
                agent
                    .exec_process(pb::ExecProcessRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        process: Some(pb::Process {
                            oci_process_json: p.process_json.clone(),
                            terminal: p.io.terminal,
                        }),
                        ..Default::default()
                    })
                    .await?;
                let attach = async {
                    let mut copies =
                        stdio::attach_outputs(&pod.agent_addr, &req.id, &req.exec_id, &p.io)
                            .await?;
                    stdio::attach_stdin(&mut copies, &pod.agent_addr, &req.id, &req.exec_id, &p.io)
                        .await?;
                    anyhow::Ok(copies)
                };
                match attach.await {
                    Ok(copies) => *p.copies.lock().await = Some(copies),
                    Err(e) => {
                        let _ = agent
                            .signal_process(pb::SignalProcessRequest {
                                container_id: req.id.clone(),
                                exec_id: req.exec_id.clone(),
                                signal: 9,
                                all: false,
                            })
                            .await;
                        return Err(err(Code::INTERNAL, format!("{e:#}")));
                    }
                }
            }
            p.set_state(PState::Running);
            self.spawn_waiter(pod.clone(), p.clone());
            if req.exec_id.is_empty() {
                self.publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid: pod.hypervisor_pid,
                        ..Default::default()
                    }),
                )
                .await;
            } else {
                self.publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid: pod.hypervisor_pid,
                        ..Default::default()
                    }),
                )
                .await;
            }
            Ok(api::StartResponse {
                pid: pod.hypervisor_pid,
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Start", t0, &r);
        r
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Delete", &req.id);
        let r: TtrpcResult<api::DeleteResponse> = async {
            let c = self.container(&req.id)?;
            let pid = self
                .0
                .pod
                .lock()
                .await
                .as_ref()
                .map(|p| p.hypervisor_pid)
                .unwrap_or(0);
            if !req.exec_id.is_empty() {
                let p = c.process(&req.exec_id)?;
                if p.state() == PState::Running {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!(
                            "exec {} of {} still runs: kill it first",
                            req.exec_id, req.id
                        ),
                    ));
                }
                c.execs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&req.exec_id);
                let e = p.exit_info().unwrap_or(Exit {
                    status: 0,
                    at: now(),
                });
                return Ok(api::DeleteResponse {
                    pid,
                    exit_status: e.status,
                    exited_at: MessageField::some(e.at),
                    ..Default::default()
                });
            }
            if c.init.state() == PState::Running {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} still runs: kill it first", req.id),
                ));
            }
            let pod = self.0.pod.lock().await.clone();
            if let Some(pod) = &pod {
                let agent = pod.agent();
                let _ = agent
                    .with_deadline(Duration::from_secs(10))
                    .remove_container(pb::RemoveContainerRequest {
                        container_id: req.id.clone(),
                        timeout: 5,
                    })
                    .await;
                if let Some(copies) = c.init.copies.lock().await.as_mut() {
                    copies.close_stdin();
                }
                if let Err(e) = mounts::unmount_and_remove(&pod.container_dir(&req.id)) {
                    warn!("{e:#}");
                }
                if !c.owner {
                    // the VM shrinks back (vCPUs; memory is kept)
                    if let Err(e) = pod.resize(&req.id, None).await {
                        warn!(container = %req.id, "resizing the VM after the delete: {e}");
                    }
                }
            }
            self.0
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.id);
            if c.owner {
                self.destroy_pod().await;
                // members deleted after their pod (`ctr task delete` of the
                // sandbox first) find their processes ended, not running
                self.end_all(pid).await;
            }
            let _ = std::fs::remove_file(Path::new(&c.bundle).join(SANDBOX_FILE));
            let e = c.init.exit_info().unwrap_or(Exit {
                status: 0,
                at: now(),
            });
            info!(container = %req.id, "container deleted");
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status: e.status,
                    exited_at: MessageField::some(e.at.clone()),
                    id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
            Ok(api::DeleteResponse {
                pid,
                exit_status: e.status,
                exited_at: MessageField::some(e.at),
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Delete", t0, &r);
        if r.is_ok() && req.exec_id.is_empty() {
            self.end_container_trace(&req.id);
        }
        r
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("State", &req.id);
        let r: TtrpcResult<api::StateResponse> = async {
            let c = self.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            let pid = self
                .0
                .pod
                .lock()
                .await
                .as_ref()
                .map(|p| p.hypervisor_pid)
                .unwrap_or(0);
            let exit = p.exit_info();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.clone(),
                pid,
                status: status_of(&p, c.paused.load(Ordering::SeqCst)).into(),
                stdin: p.io.stdin.clone(),
                stdout: p.io.stdout.clone(),
                stderr: p.io.stderr.clone(),
                terminal: p.io.terminal,
                exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
                exited_at: exit.map(|e| e.at).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "State", t0, &r);
        r
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Pids", &req.id);
        let r: TtrpcResult<api::PidsResponse> = async {
            self.container(&req.id)?;
            let agent = self.pod().await?.agent();
            let r = agent
                .list_processes(pb::ListProcessesRequest {
                    container_id: req.id.clone(),
                    format: "json".into(),
                    args: vec![],
                })
                .await?;
            Ok(api::PidsResponse {
                processes: r
                    .pids
                    .into_iter()
                    .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                        pid: pid as u32,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Pids", t0, &r);
        r
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Pause", &req.id);
        let r: TtrpcResult<api::Empty> = async { self.set_paused(&req.id, true).await }
            .instrument(span.clone())
            .await;
        finish(&span, "Pause", t0, &r);
        r
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Resume", &req.id);
        let r: TtrpcResult<api::Empty> = async { self.set_paused(&req.id, false).await }
            .instrument(span.clone())
            .await;
        finish(&span, "Resume", t0, &r);
        r
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Checkpoint", &_req.id);
        let r: TtrpcResult<api::Empty> = async {
            Err(err(
                Code::UNIMPLEMENTED,
                "checkpoint is not supported by kata-rs: a VM's containers cannot be checkpointed with CRIU",
            ))
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Checkpoint", t0, &r);
        r
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Kill", &req.id);
        let r: TtrpcResult<api::Empty> = async {
            let c = self.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            if p.state() == PState::Stopped && !req.all {
                return Err(err(Code::NOT_FOUND, "process already finished"));
            }
            if p.state() == PState::Created && req.exec_id.is_empty() {
                // never started: nothing runs in the guest yet but its init waits
                // for the start signal; ending it makes the task stopped
                let pod = self.pod().await?;
                let agent = pod.agent();
                let _ = agent
                    .remove_container(pb::RemoveContainerRequest {
                        container_id: req.id.clone(),
                        timeout: 0,
                    })
                    .await;
                self.exited(&p, 128 + req.signal, pod.hypervisor_pid).await;
                return Ok(api::Empty::default());
            }
            let agent = self.pod().await?.agent();
            agent
                .signal_process(pb::SignalProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    signal: req.signal,
                    all: req.all,
                })
                .await?;
            Ok(api::Empty::default())
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Kill", t0, &r);
        r
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Exec", &req.id);
        let r: TtrpcResult<api::Empty> = async {
            let c = self.container(&req.id)?;
            if req.exec_id.is_empty() {
                return Err(err(Code::INVALID_ARGUMENT, "an exec needs an id"));
            }
            let json = req
                .spec
                .as_ref()
                .map(|a| String::from_utf8_lossy(&a.value).into_owned())
                .ok_or_else(|| err(Code::INVALID_ARGUMENT, "an exec needs a process spec"))?;
            let process: oci_spec::runtime::Process = serde_json::from_str(&json).map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("the exec's process spec is not valid: {e}"),
                )
            })?;
            let io = Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal || process.terminal().unwrap_or(false),
            };
            {
                let mut execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
                if execs.contains_key(&req.exec_id) {
                    return Err(err(
                        Code::ALREADY_EXISTS,
                        format!("exec {} already exists in {}", req.exec_id, req.id),
                    ));
                }
                execs.insert(
                    req.exec_id.clone(),
                    Proc::new(&req.id, &req.exec_id, io, json),
                );
            }
            self.publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
            Ok(api::Empty::default())
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Exec", t0, &r);
        r
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("ResizePty", &req.id);
        let r: TtrpcResult<api::Empty> = async {
            self.container(&req.id)?.process(&req.exec_id)?;
            let agent = self.pod().await?.agent();
            agent
                .tty_win_resize(pb::TtyWinResizeRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    row: req.height,
                    column: req.width,
                })
                .await?;
            Ok(api::Empty::default())
        }
        .instrument(span.clone())
        .await;
        finish(&span, "ResizePty", t0, &r);
        r
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("CloseIo", &req.id);
        let r: TtrpcResult<api::Empty> = async {
            let p = self.container(&req.id)?.process(&req.exec_id)?;
            if req.stdin {
                // what containerd wrote before closing is still delivered
                let ended = p.copies.lock().await.as_mut().map(|c| c.end_stdin());
                if let Some(ended) = ended {
                    ended.await;
                }
            }
            Ok(api::Empty::default())
        }
        .instrument(span.clone())
        .await;
        finish(&span, "CloseIo", t0, &r);
        r
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Update", &req.id);
        let r: TtrpcResult<api::Empty> = async {
            self.container(&req.id)?;
            let json = req
                .resources
                .as_ref()
                .map(|a| String::from_utf8_lossy(&a.value).into_owned())
                .unwrap_or_default();
            let res =
                serde_json::from_str::<oci_spec::runtime::LinuxResources>(&json).map_err(|e| {
                    err(
                        Code::INVALID_ARGUMENT,
                        format!("the resources are not valid OCI LinuxResources: {e}"),
                    )
                })?;
            let pod = self.pod().await?;
            // the VM (and the host cgroup) first: the container's new limits
            // need the vCPUs and memory to be there
            pod.resize(
                &req.id,
                Some(kata_proto::config::Workload::from_resources(Some(&res))),
            )
            .await
            .map_err(|e| err(e.code(), format!("updating {}: {e}", req.id)))?;
            let agent = pod.agent();
            agent
                .update_container(pb::UpdateContainerRequest {
                    container_id: req.id.clone(),
                    resources: Some(pb::LinuxResources {
                        oci_resources_json: json,
                    }),
                })
                .await?;
            Ok(api::Empty::default())
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Update", t0, &r);
        r
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Wait", &req.id);
        let r: TtrpcResult<api::WaitResponse> = async {
            let p = self.container(&req.id)?.process(&req.exec_id)?;
            let mut rx = p.exit.subscribe();
            let e = loop {
                if let Some(e) = rx.borrow_and_update().clone() {
                    break e;
                }
                if rx.changed().await.is_err() {
                    return Err(err(Code::INTERNAL, "the process went away"));
                }
            };
            Ok(api::WaitResponse {
                exit_status: e.status,
                exited_at: MessageField::some(e.at),
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Wait", t0, &r);
        r
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Stats", &req.id);
        let r: TtrpcResult<api::StatsResponse> = async {
            self.container(&req.id)?;
            let agent = self.pod().await?.agent();
            let r = agent
                .stats_container(pb::StatsContainerRequest {
                    container_id: req.id.clone(),
                })
                .await?;
            let any = crate::stats::to_any(&r).map_err(|e| err(Code::INTERNAL, e))?;
            Ok(api::StatsResponse {
                stats: MessageField::some(any),
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Stats", t0, &r);
        r
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Connect", "");
        let r: TtrpcResult<api::ConnectResponse> = async {
            let pid = self
                .0
                .pod
                .lock()
                .await
                .as_ref()
                .map(|p| p.hypervisor_pid)
                .unwrap_or(0);
            Ok(api::ConnectResponse {
                shim_pid: std::process::id(),
                task_pid: pid,
                version: kata_proto::VERSION.into(),
                ..Default::default()
            })
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Connect", t0, &r);
        r
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let t0 = std::time::Instant::now();
        let span = self.call_span("Shutdown", "");
        let r: TtrpcResult<api::Empty> = async {
            let empty = self
                .0
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            if empty {
                self.destroy_pod().await;
                info!("shutting down");
                // the process ends soon: what was traced leaves first
                self.0
                    .traces
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                kata_proto::trace::flush(Duration::from_secs(2));
                self.0.exit.signal();
            }
            Ok(api::Empty::default())
        }
        .instrument(span.clone())
        .await;
        finish(&span, "Shutdown", t0, &r);

        r
    }
}
