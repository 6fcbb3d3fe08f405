//! The Prometheus text exposition format, so the orchestrator's and the PNode's `/metrics`
//! speak the same format.

use dcnr_proto::shaping::link_bytes;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge, Registry};
use std::sync::Mutex;

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

/// The process's client-connection byte counters (`dcnr_proto::shaping`) and its relay's
/// counters (`crate::relay::RELAY`), the former as
/// `dcnr_link_bytes_sent_total` and `dcnr_link_bytes_received_total`, read at scrape time.
/// Every connection is counted by its client only, so summing these over all processes counts
/// each byte on the wire once.
pub struct LinkBytesCollector {
    sent: IntCounter,
    received: IntCounter,
    /// TLS handshakes this process's servers refused or that timed out.
    refused_handshakes: IntCounter,
    /// This process's relay, if it runs one (`crate::relay::RELAY`).
    relay_listening: IntGauge,
    relay_spliced: IntCounter,
    relay_refused: IntCounter,
    relay_bytes: IntCounter,
    /// Two scrapes at once must not both add the same increase.
    catch_up: Mutex<()>,
}

impl LinkBytesCollector {
    /// A collector reading this process's counters.
    pub fn new() -> Result<LinkBytesCollector, prometheus::Error> {
        Ok(LinkBytesCollector {
            sent: IntCounter::new("dcnr_link_bytes_sent_total", "Bytes written by this process's gRPC clients.")?,
            received: IntCounter::new("dcnr_link_bytes_received_total", "Bytes read by this process's gRPC clients.")?,
            refused_handshakes: IntCounter::new(
                "dcnr_tls_handshakes_refused_total",
                "TLS handshakes this process's servers refused or that timed out.",
            )?,
            relay_listening: IntGauge::new(
                "dcnr_relay_listening",
                "PNodes behind NAT listening at this process's relay.",
            )?,
            relay_spliced: IntCounter::new(
                "dcnr_relay_connections_total",
                "Connections this process's relay has relayed.",
            )?,
            relay_refused: IntCounter::new(
                "dcnr_relay_refused_total",
                "Connections this process's relay refused or that failed their handshake.",
            )?,
            relay_bytes: IntCounter::new(
                "dcnr_relay_bytes_total",
                "Bytes this process's relay copied, both directions, counted when a connection ends.",
            )?,
            catch_up: Mutex::new(()),
        })
    }
}

impl Collector for LinkBytesCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.sent
            .desc()
            .into_iter()
            .chain(self.received.desc())
            .chain(self.refused_handshakes.desc())
            .chain(self.relay_listening.desc())
            .chain(self.relay_spliced.desc())
            .chain(self.relay_refused.desc())
            .chain(self.relay_bytes.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.catch_up.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = link_bytes();
        self.sent.inc_by(now.sent.saturating_sub(self.sent.get()));
        self.received.inc_by(now.received.saturating_sub(self.received.get()));
        let refused = dcnr_proto::transport::refused_handshakes();
        self.refused_handshakes.inc_by(refused.saturating_sub(self.refused_handshakes.get()));
        let relay = &crate::relay::RELAY;
        let read = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        self.relay_listening.set(i64::try_from(read(&relay.listeners)).unwrap_or(i64::MAX));
        for (counter, now) in [
            (&self.relay_spliced, read(&relay.spliced_total)),
            (&self.relay_refused, read(&relay.refused_total)),
            (&self.relay_bytes, read(&relay.bytes_total)),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        self.sent
            .collect()
            .into_iter()
            .chain(self.received.collect())
            .chain(self.refused_handshakes.collect())
            .chain(self.relay_listening.collect())
            .chain(self.relay_spliced.collect())
            .chain(self.relay_refused.collect())
            .chain(self.relay_bytes.collect())
            .collect()
    }
}

/// Adds the link byte counters to `r`.
pub fn register_link_bytes(r: &Registry) {
    match LinkBytesCollector::new() {
        Ok(c) => register(r, Box::new(c)),
        Err(e) => tracing::error!(error = %e, "link byte counters unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_bytes_render_as_counters() {
        let r = Registry::new();
        register_link_bytes(&r);
        let text = encode(&r);
        for line in [
            "# TYPE dcnr_link_bytes_sent_total counter",
            "# TYPE dcnr_link_bytes_received_total counter",
            "# TYPE dcnr_tls_handshakes_refused_total counter",
            "# TYPE dcnr_relay_listening gauge",
            "# TYPE dcnr_relay_connections_total counter",
            "# TYPE dcnr_relay_bytes_total counter",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
