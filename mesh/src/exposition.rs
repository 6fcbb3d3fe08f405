//! The Prometheus text exposition format, so the orchestrator's and the PNode's `/metrics`
//! speak the same format.

use prometheus::Registry;

/// The Prometheus text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric of `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

/// Adds a collector; metric names are fixed in the code that defines them, so a clash is a
/// programming error that each registry's unit test catches.
pub fn register(r: &Registry, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = r.register(c) {
        tracing::error!(error = %e, "metric registration failed");
    }
}
