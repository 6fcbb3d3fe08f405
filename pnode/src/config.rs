//! Command-line flags of a PNode (every flag also reads an environment variable).

use std::net::SocketAddr;
use std::time::Duration;

/// Flags of `pnode`.
#[derive(Debug, Clone, clap::Args)]
pub struct PnodeArgs {
    /// Orchestrator to join.
    #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "http://127.0.0.1:7070")]
    pub orchestrator: String,
    /// Address to serve VNode traffic on (port 0 picks a free port).
    #[arg(long, env = "DCNR_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address others use to reach this PNode, if not the listen address (e.g. behind NAT).
    #[arg(long, env = "DCNR_ADVERTISE")]
    pub advertise: Option<String>,
    /// Human-readable name shown by the orchestrator.
    #[arg(long, env = "DCNR_NAME", default_value = "pnode")]
    pub name: String,
    /// Most VNodes this PNode hosts at once.
    #[arg(long, env = "DCNR_MAX_VNODES", default_value_t = 64)]
    pub max_vnodes: usize,
    /// Cores to advertise (default: all available).
    #[arg(long, env = "DCNR_CORES")]
    pub cores: Option<u32>,
    /// Memory to advertise, and to allow hosted VNodes in all, in MiB (default: physical memory,
    /// not enforced).
    #[arg(long, env = "DCNR_MEMORY_MIB")]
    pub memory_mib: Option<u64>,
    /// Seconds to keep retrying the first connection to the orchestrator.
    #[arg(long, env = "DCNR_CONNECT_TIMEOUT", default_value_t = 30)]
    pub connect_timeout_s: u64,
    /// Async I/O threads (tensor math runs on separate per-VNode threads).
    #[arg(long, env = "DCNR_IO_THREADS", default_value_t = 2)]
    pub io_threads: usize,
    /// Exit when the orchestrator has been unreachable this many seconds (0 = retry forever).
    #[arg(long, env = "DCNR_ORPHAN_TIMEOUT_S", default_value_t = 0)]
    pub orphan_timeout_s: u64,
    /// Serve Prometheus metrics on this address at /metrics (e.g. 127.0.0.1:9101; port 0 picks one).
    #[arg(long, env = "DCNR_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Protocol version to announce; a testing aid for version negotiation.
    #[arg(long, hide = true, default_value_t = dcnr_proto::PROTOCOL_VERSION)]
    pub protocol_version: u32,
}

impl PnodeArgs {
    /// How long to retry reaching the orchestrator at start.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_s)
    }
}
