//! The PNode runtime: joins an orchestrator, hosts VNodes as actors, and moves their traffic.
//!
//! Module map: [`config`] (flags), [`identity`] (the key pair behind the PNode id),
//! [`membership`] (signed registration and heartbeat with every orchestrator named),
//! [`orchestrators`] (which orchestrator each hosted job answers to), [`actors`] (the VNode actors and their
//! host; inbound tensors pass the cheap checks first), [`datasets`] (the dataset packs VNodes
//! build their data inputs from: fetched once, cached, shared), [`router`] (where an outbound
//! message goes: a local actor or a remote PNode), [`fault`] (fault injection, a testing aid, hooked
//! where outputs leave the router), [`service`] (the gRPC adapter), [`capabilities`] (what this
//! machine advertises), [`metrics`] (Prometheus counters and the `/metrics` endpoint). Wire
//! conversions, the tensor stream to other PNodes, the metrics text format and shutdown signals
//! come from `dcnr-mesh`, which the orchestrator shares. Which modules may name tonic, actix or
//! HTTP crates is stated once, in docs/ARCHITECTURE.md ("Which modules name which framework").
//!
//! Architecture invariant: the training math lives in `dcnr-vnode`; this crate never computes,
//! it only hosts, routes and reports. Tensor math runs on each VNode actor's own thread, never on
//! the async I/O threads.

pub mod actors;
pub mod capabilities;
pub mod config;
pub mod datasets;
pub mod discover;
pub mod gpu;
pub use dcnr_vnode::fault;
pub mod identity;
pub mod membership;
pub mod metrics;
pub mod orchestrators;
pub mod pinning;
pub mod router;
pub mod senders;
pub mod service;

pub use config::PnodeArgs;

use anyhow::Context as _;
use dcnr_mesh::signal::shutdown_signal;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Says once, in the log and in `dcnr_pnode_gpu_working`, when the GPU offered fails: its
/// VNodes then compute on the CPU and new GPU work is refused, so the orchestrator places it
/// elsewhere.
async fn watch_gpu(gpu: dcnr_vnode::Compute) {
    metrics::PNODE.gpu_working.set(1);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(why) = gpu.failure() {
            metrics::PNODE.gpu_working.set(0);
            tracing::warn!(
                error = why,
                "the GPU failed: its VNodes compute on the CPU now, and new GPU work is refused"
            );
            return;
        }
    }
}

/// Runs a PNode until Ctrl-C/SIGTERM. Must run inside an actix
/// System (see [`run_blocking`]).
pub async fn run(args: PnodeArgs) -> anyhow::Result<()> {
    discover::check(&args)?;
    // The device first: a GPU asked for and missing ends the start before anything connects.
    let gpu = gpu::choose(args.device)?;
    match &gpu {
        Some(g) => tracing::info!(
            gpu = %g.description,
            gflops = format!("{:.1}", g.gflops),
            cpu_gflops = format!("{:.1}", g.host_gflops),
            "offering a GPU"
        ),
        None => tracing::debug!("offering the CPU only"),
    }
    // Before any connection opens: connections keep the settings they were opened with.
    let shape = args.link_shape()?;
    dcnr_proto::shaping::configure(shape)?;
    if let Some(s) = shape {
        tracing::info!(link = %s, "link emulation is on (a testing aid): every connection this pnode opens is shaped");
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let local: SocketAddr = listener.local_addr()?;
    if let Some(addr) = args.metrics {
        let at = metrics::start_pnode_exporter(addr).await?;
        tracing::info!(%at, "serving metrics at http://{at}/metrics");
    }
    let mut given = args.clone();
    if let Some(listen) = args.relay_listen {
        given.relay_advertise = Some(dcnr_mesh::relay::start(listen, args.relay_advertise.clone()).await?);
    }
    let args = discover::choose(&given).await?;
    let tls = pinning::setup(&args).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = args.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let key = match &args.data_dir {
        Some(dir) => identity::NodeKey::load_or_create(dir)?,
        None => {
            if !args.ephemeral {
                tracing::warn!("no --data-dir: this pnode gets a new identity, with no reputation, at every start");
            }
            identity::NodeKey::ephemeral()?
        }
    };
    let creds = membership::Credentials {
        key: std::sync::Arc::new(key),
        token: args.trusted_token()?,
        certificate: tls.as_ref().map(|t| t.identity.clone()),
    };
    let capabilities = capabilities::detect(args.cores, args.memory_mib, gpu.as_ref());
    let fault = args.injector();
    if let Some(f) = &fault {
        tracing::warn!(
            kind = f.spec().kind.name(),
            rate = f.spec().rate,
            "fault injection is on: this pnode misbehaves"
        );
    }

    let orchestrators = orchestrators::Orchestrators::new();
    let router = router::Router::start(orchestrators.clone(), creds.key.clone(), fault);
    // Without --memory-mib, three quarters of physical memory: one allocation must not be able
    // to ask for more than the machine has.
    let memory_limit = match args.memory_mib {
        Some(m) => m.saturating_mul(1024 * 1024),
        None => capabilities::detect(None, None, None).memory_bytes / 4 * 3,
    };
    let host = actors::Host::start_new(router.clone(), args.max_vnodes, memory_limit);
    let (relayed_tx, relayed_rx) = tokio::sync::mpsc::channel(64);
    let shared = membership::Shared {
        given,
        endpoint,
        creds,
        host: host.clone(),
        router: router.clone(),
        orchestrators: orchestrators.clone(),
        relayed: relayed_tx,
        capabilities,
    };
    // The first orchestrator is joined before anything is served, so a refusal ends the start.
    let first = membership::join(&shared, args.clone(), args.connect_timeout()).await?;
    let hosting = service::Hosting {
        host,
        router: router.clone(),
        datasets: std::sync::Arc::new(datasets::Datasets::new(args.data_dir.as_deref(), args.max_dataset_bytes())),
        senders: std::sync::Arc::new(senders::Senders::new(orchestrators.clone())),
        orchestrators: orchestrators.clone(),
        gpu: gpu.as_ref().map(|g| g.compute.clone()).unwrap_or_default(),
    };
    let server_tls = tls.as_ref().map(|t| t.server_config()).transpose()?;
    if let Some(g) = &gpu {
        tokio::spawn(watch_gpu(g.compute.clone()));
    }
    let mut server = tokio::spawn(service::serve(listener, relayed_rx, server_tls, hosting));
    let mut members = tokio::spawn(membership::keep_memberships(shared, first));
    tokio::select! {
        r = &mut server => return r.context("gRPC server task failed")?.context("gRPC server failed"),
        r = &mut members => return r.context("membership task failed")?,
        _ = shutdown_signal() => {}
    }
    // A graceful leave: the service keeps running while the orchestrators move our VNodes away.
    let timeout = Duration::from_secs(args.drain_timeout_s);
    if !timeout.is_zero() {
        tracing::info!("leaving: asking the orchestrators to move this pnode's VNodes");
        let id = router.pnode_id();
        let drains = orchestrators.members().into_iter().map(|(instance, link)| {
            let id = id.clone();
            async move {
                match link.drain(&id, timeout).await {
                    Ok(0) => tracing::info!(%instance, "drained; no work is lost"),
                    Ok(n) => {
                        tracing::warn!(%instance, remaining = n, "drain timed out; the orchestrator will recover these VNodes")
                    }
                    Err(s) => {
                        tracing::warn!(%instance, status = %s, "drain failed; the orchestrator will recover this pnode's VNodes")
                    }
                }
            }
        });
        tokio::select! {
            _ = futures::future::join_all(drains) => {}
            _ = shutdown_signal() => tracing::warn!("second signal: leaving without draining"),
        }
    }
    members.abort();
    server.abort();
    tracing::info!("shutting down");
    Ok(())
}

/// Runs [`run`] on a fresh actix System backed by a multi-threaded tokio runtime.
pub fn run_blocking(args: PnodeArgs) -> anyhow::Result<()> {
    let workers = args.io_threads.max(1);
    actix_rt::System::with_tokio_rt(move || {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap_or_else(|e| {
            // Without a runtime nothing can run; say why before exiting.
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(70)
        })
    })
    .block_on(run(args))
}
