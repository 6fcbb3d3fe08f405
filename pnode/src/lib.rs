//! The PNode runtime: joins an orchestrator, hosts VNodes as actors, and moves their traffic.
//!
//! Module map: [`config`] (flags), [`membership`] (register and heartbeat), [`actors`] (the
//! VNode actors and their host), [`router`] (where an outbound message goes: a local actor or a
//! remote PNode), [`service`] (the gRPC adapter; with `convert`, the only code here that sees
//! wire types), [`capabilities`] (what this machine advertises), [`metrics`] (Prometheus
//! counters and the `/metrics` endpoint, shared with the orchestrator).
//!
//! Architecture invariant: the training math lives in `dcnr-vnode`; this crate never computes,
//! it only hosts, routes and reports. Tensor math runs on each VNode actor's own thread, never on
//! the async I/O threads.

pub mod actors;
pub mod capabilities;
pub mod config;
pub mod convert;
pub mod membership;
pub mod metrics;
pub mod router;
pub mod service;

pub use config::PnodeArgs;

use anyhow::Context as _;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Runs a PNode until Ctrl-C/SIGTERM or until `shutdown` resolves. Must run inside an actix
/// System (see [`run_blocking`]).
pub async fn run(args: PnodeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let local: SocketAddr = listener.local_addr()?;
    if let Some(addr) = args.metrics {
        let at = metrics::start_pnode_exporter(addr).await?;
        tracing::info!(%at, "serving metrics at http://{at}/metrics");
    }
    let endpoint = args.advertise.clone().unwrap_or_else(|| format!("http://{local}"));
    let orchestrator = membership::OrchestratorLink::connect(&args.orchestrator, args.connect_timeout())
        .await
        .with_context(|| format!("cannot reach orchestrator at {}", args.orchestrator))?;
    let identity = membership::register(&orchestrator, &args, &endpoint).await?;
    tracing::info!(pnode = %identity.pnode_id, %endpoint, "registered with orchestrator");

    let router = router::Router::start(orchestrator.clone(), identity.pnode_id.clone());
    let memory_limit = args.memory_mib.map(|m| m * 1024 * 1024).unwrap_or(0);
    let host = actors::Host::start_new(router.clone(), args.max_vnodes, memory_limit);
    let server = service::serve(listener, host.clone(), router.clone());
    let heartbeat = membership::heartbeat_loop(orchestrator, args.clone(), endpoint, identity, host);
    tokio::select! {
        r = server => r.context("gRPC server failed")?,
        r = heartbeat => r?,
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
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

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
