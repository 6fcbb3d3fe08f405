//! Prometheus metrics: the PNode's own counters and a small `/metrics` HTTP server. The text
//! encoding is `dcnr_mesh::exposition`, the one the orchestrator's `/metrics` uses too.
//!
//! Counters are process-wide statics (the usual shape for Prometheus instrumentation): the
//! code that counts is one line and needs no handle passed down to it.

use anyhow::Context as _;
use dcnr_mesh::exposition::{CONTENT_TYPE, encode, register, register_link_bytes};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::net::SocketAddr;
use std::sync::LazyLock;

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    register(r, Box::new(c.clone()));
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    register(r, Box::new(c.clone()));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    register(r, Box::new(g.clone()));
    g
}

/// What a PNode counts.
pub struct PnodeMetrics {
    /// The registry all of these belong to.
    pub registry: Registry,
    /// VNodes hosted now.
    pub hosted_vnodes: IntGauge,
    /// Messages handed to VNodes, by pass (`forward`, `backward`).
    pub vnode_messages_in: IntCounterVec,
    /// Messages VNodes emitted, by kind (`forward`, `backward`, `done`, `loss`).
    pub vnode_messages_out: IntCounterVec,
    /// Training micro-batches completed by hosted VNodes.
    pub vnode_steps: IntCounter,
    /// Wall time of VNode compute, in microseconds.
    pub compute_us: IntCounter,
    /// Tensor bytes into and out of VNodes, by direction (`in`, `out`).
    pub tensor_bytes: IntCounterVec,
    /// VNode messages received from other PNodes and the orchestrator over gRPC.
    pub wire_messages_received: IntCounter,
    /// Encoded bytes of those messages.
    pub wire_bytes_received: IntCounter,
    /// VNodes that failed.
    pub vnode_failures: IntCounter,
    /// Dataset packs made ready for an allocation, by where they came from (`orchestrator`,
    /// `disk`, `memory`).
    pub dataset_loads: IntCounterVec,
    /// Bytes of dataset packs fetched from the orchestrator.
    pub dataset_bytes_fetched: IntCounter,
    /// Cached dataset packs found corrupt (and fetched again).
    pub dataset_cache_corrupt: IntCounter,
    /// Feed requests refused (a port that reads no data, a batch beyond the data).
    pub feeds_refused: IntCounter,
    /// Calls refused for want of a credential or permission, by RPC and gRPC code.
    pub rpc_refused: IntCounterVec,
    /// 1 while the GPU offered works, 0 once it has failed or when none is offered.
    pub gpu_working: IntGauge,
}

/// This process's PNode metrics.
pub static PNODE: LazyLock<PnodeMetrics> = LazyLock::new(|| {
    let r = Registry::new();
    register_link_bytes(&r);
    PnodeMetrics {
        hosted_vnodes: gauge(&r, "dcnr_pnode_hosted_vnodes", "VNodes hosted now."),
        vnode_messages_in: counter_vec(
            &r,
            "dcnr_pnode_vnode_messages_in_total",
            "Messages handed to hosted VNodes.",
            &["pass"],
        ),
        vnode_messages_out: counter_vec(
            &r,
            "dcnr_pnode_vnode_messages_out_total",
            "Messages emitted by hosted VNodes.",
            &["kind"],
        ),
        vnode_steps: counter(&r, "dcnr_pnode_vnode_steps_total", "Training micro-batches completed by hosted VNodes."),
        compute_us: counter(&r, "dcnr_pnode_compute_microseconds_total", "Wall time of VNode forward and backward."),
        tensor_bytes: counter_vec(
            &r,
            "dcnr_pnode_tensor_bytes_total",
            "Tensor bytes into and out of hosted VNodes.",
            &["direction"],
        ),
        wire_messages_received: counter(
            &r,
            "dcnr_pnode_wire_messages_received_total",
            "VNode messages received over gRPC.",
        ),
        wire_bytes_received: counter(
            &r,
            "dcnr_pnode_wire_bytes_received_total",
            "Encoded bytes of VNode messages received over gRPC.",
        ),
        vnode_failures: counter(&r, "dcnr_pnode_vnode_failures_total", "VNodes that failed."),
        dataset_loads: counter_vec(
            &r,
            "dcnr_pnode_dataset_loads_total",
            "Dataset packs made ready for an allocation, by source.",
            &["source"],
        ),
        dataset_bytes_fetched: counter(
            &r,
            "dcnr_pnode_dataset_bytes_fetched_total",
            "Bytes of dataset packs fetched from the orchestrator.",
        ),
        dataset_cache_corrupt: counter(
            &r,
            "dcnr_pnode_dataset_cache_corrupt_total",
            "Cached dataset packs found corrupt and fetched again.",
        ),
        feeds_refused: counter(&r, "dcnr_pnode_feeds_refused_total", "Feed requests refused."),
        rpc_refused: counter_vec(
            &r,
            "dcnr_rpc_refused_total",
            "Calls refused for want of a credential or permission, by RPC and gRPC code.",
            &["rpc", "code"],
        ),
        gpu_working: gauge(&r, "dcnr_pnode_gpu_working", "1 while the GPU this PNode offers works."),
        registry: r,
    }
});

/// Serves `GET /metrics` on `listener` with `render` producing the text, until the process ends.
pub async fn serve<F>(listener: tokio::net::TcpListener, render: F) -> anyhow::Result<()>
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
        }),
    );
    axum::serve(listener, app).await.context("metrics server failed")
}

/// Binds `addr` and serves this PNode's metrics on it in the background; returns where.
pub async fn start_pnode_exporter(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, || encode(&PNODE.registry)).await {
            tracing::error!(error = %e, "metrics exporter stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pnode_metric_registers_and_renders() {
        PNODE.vnode_steps.inc();
        PNODE.tensor_bytes.with_label_values(&["in"]).inc_by(10);
        let text = encode(&PNODE.registry);
        for name in [
            "dcnr_pnode_vnode_steps_total 1",
            "dcnr_pnode_tensor_bytes_total{direction=\"in\"} 10",
            "dcnr_link_bytes_sent_total",
            "dcnr_link_bytes_received_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("# TYPE dcnr_pnode_hosted_vnodes gauge"));
    }
}
