//! Command-line flags of a PNode (every flag also reads an environment variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The device a PNode offers (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The CPU only.
    Cpu,
    /// A GPU, or no start.
    Gpu,
    /// A hardware GPU if one works, else the CPU.
    Auto,
}

/// Flags of `pnode`.
#[derive(Debug, Clone, clap::Args)]
pub struct PnodeArgs {
    /// Orchestrator to join: a URL, or several comma-separated, or `dns:NAME` (the SRV records
    /// of `_dcnr._tcp.NAME` list orchestrators; a TXT record there may pin the CA with
    /// `dcnr-ca-sha256=HEX`). Every one that answers is joined, and a list or name is looked up
    /// again every few seconds.
    #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "https://127.0.0.1:7070")]
    pub orchestrator: String,
    /// DNS server for `dns:` names (default: this machine's resolver configuration).
    #[arg(long, env = "DCNR_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Address to serve VNode traffic on (port 0 picks a free port).
    #[arg(long, env = "DCNR_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address others use to reach this PNode, if not the listen address (e.g. a port
    /// forwarded on a home router).
    #[arg(long, env = "DCNR_ADVERTISE")]
    pub advertise: Option<String>,
    /// This PNode cannot accept connections (behind NAT or a firewall): be reached through a
    /// relay over connections it opens itself. Without it the orchestrator finds out by trying
    /// to connect to the advertised address.
    #[arg(long, env = "DCNR_BEHIND_NAT")]
    pub behind_nat: bool,
    /// Offer a relay on this address to PNodes behind NAT (this PNode must be reachable).
    #[arg(long, env = "DCNR_RELAY_LISTEN", conflicts_with = "behind_nat")]
    pub relay_listen: Option<SocketAddr>,
    /// `host:port` others dial to reach this PNode's relay (default: the --relay-listen address).
    #[arg(long, env = "DCNR_RELAY_ADVERTISE", requires = "relay_listen")]
    pub relay_advertise: Option<String>,
    /// Which device to offer: `cpu`; `gpu` (a GPU adapter must work, or the PNode does not
    /// start; a software one such as lavapipe counts); `auto` (a hardware GPU if one works,
    /// else the CPU). A GPU needs a build with the cargo feature `gpu`.
    #[arg(long, env = "DCNR_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Human-readable name shown by the orchestrator.
    #[arg(long, env = "DCNR_NAME", default_value = "pnode")]
    pub name: String,
    /// Most VNodes this PNode hosts at once.
    #[arg(long, env = "DCNR_MAX_VNODES", default_value_t = 64)]
    pub max_vnodes: usize,
    /// Cores to advertise (default: all available).
    #[arg(long, env = "DCNR_CORES")]
    pub cores: Option<u32>,
    /// Memory to advertise, and to allow hosted VNodes in all, in MiB (default: physical memory
    /// advertised, three quarters of it enforced).
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
    /// On SIGTERM/Ctrl-C, wait up to this many seconds for the orchestrator to move this PNode's
    /// VNodes before exiting (0 = leave at once; a second signal also leaves at once).
    #[arg(long, env = "DCNR_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Directory for this PNode's identity key (created on first start, mode 0700; the key file
    /// is 0600) and its cache of dataset packs (`datasets/`). Without it the PNode gets a new
    /// identity, and no reputation, at every start, and fetches datasets again.
    #[arg(long, env = "DCNR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Run without --data-dir on purpose (a throwaway PNode, such as those of a local mesh): a
    /// new identity at every start, and no warning about it.
    #[arg(long, conflicts_with = "data_dir")]
    pub ephemeral: bool,
    /// Largest dataset pack this PNode fetches and keeps, in MiB; an allocation whose job reads
    /// a larger one is refused. Packs are cached in `<data-dir>/datasets` (in memory only
    /// without --data-dir).
    #[arg(long, env = "DCNR_MAX_DATASET_MIB", default_value_t = 512)]
    pub max_dataset_mib: u64,
    /// File holding the orchestrator's trusted-mode token; a PNode presenting it is trusted and
    /// gets reduced validation (docs/TRUST.md).
    #[arg(long, env = "DCNR_TRUSTED_TOKEN_FILE")]
    pub trusted_token_file: Option<PathBuf>,
    /// Testing aid: misbehave on purpose, to exercise the orchestrator's validation. KIND is
    /// corrupt (noise), sign-flip (negated gradients), scale (x100), nan, lazy (zeros instead
    /// of results) or slow (delays); RATE in (0, 1] is the fraction of executions hit (default 1).
    #[arg(long, env = "DCNR_FAULT", value_name = "KIND[:RATE]")]
    pub fault: Option<crate::fault::FaultSpec>,
    /// Seed deciding which executions a --fault hits (same seed, same places).
    #[arg(long, env = "DCNR_FAULT_SEED", default_value_t = 0)]
    pub fault_seed: u64,
    /// Delay of each message under --fault slow, in milliseconds.
    #[arg(long, env = "DCNR_FAULT_DELAY_MS", default_value_t = 100)]
    pub fault_delay_ms: u64,
    /// With --fault: report the output hash of the honest result instead of what was sent (a
    /// cheater covering its tracks; only its signatures on what it sent give it away).
    #[arg(long, env = "DCNR_FAULT_CONCEAL", requires = "fault")]
    pub fault_conceal: bool,
    /// Serve Prometheus metrics on this address at /metrics (e.g. 127.0.0.1:9101; port 0 picks one).
    #[arg(long, env = "DCNR_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Testing aid: emulate a wide-area link on every connection this PNode opens (to the
    /// orchestrator and to other PNodes), in both directions: one-way delay in milliseconds.
    #[arg(long, env = "DCNR_LINK_DELAY_MS", default_value_t = 0, value_name = "MS")]
    pub link_delay_ms: u64,
    /// Testing aid: bandwidth cap per direction, in Mbit/s, on every connection this PNode
    /// opens (0 = unlimited).
    #[arg(long, env = "DCNR_LINK_MBIT", default_value_t = 0.0, value_name = "MBIT")]
    pub link_mbit: f64,
    /// The orchestrator's CA certificate (PEM): the orchestrator and every other PNode must
    /// hold a certificate from it.
    #[arg(long, env = "DCNR_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Instead of a CA file: the SHA-256 (hex) of the orchestrator's CA certificate, as
    /// `orchestrator serve` prints it. Without either, the CA the orchestrator presents at the
    /// first start is trusted and kept in the data directory (trust on first use).
    #[arg(long, env = "DCNR_CA_SHA256", value_name = "HEX")]
    pub ca_sha256: Option<String>,
    /// Local development only: no TLS and no authentication on any link (the orchestrator and
    /// every PNode must agree).
    #[arg(long, env = "DCNR_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// Protocol version to announce; a testing aid for version negotiation.
    #[arg(long, hide = true, default_value_t = dcnr_proto::PROTOCOL_VERSION)]
    pub protocol_version: u32,
}

impl PnodeArgs {
    /// How long to retry reaching the orchestrator at start.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_s)
    }

    /// The trusted-mode token from `--trusted-token-file` (surrounding whitespace removed), or
    /// an empty string without one.
    pub fn trusted_token(&self) -> anyhow::Result<String> {
        use anyhow::Context as _;
        let Some(path) = &self.trusted_token_file else { return Ok(String::new()) };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the trusted token file {}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            anyhow::bail!("the trusted token file {} is empty", path.display());
        }
        Ok(token.to_string())
    }

    /// The link emulation asked for by `--link-delay-ms` and `--link-mbit`, if any.
    pub fn link_shape(&self) -> anyhow::Result<Option<dcnr_proto::shaping::LinkShape>> {
        use anyhow::Context as _;
        dcnr_proto::shaping::LinkShape::from_flags(self.link_delay_ms, self.link_mbit)
            .context("invalid --link-delay-ms / --link-mbit")
    }

    /// Largest dataset pack accepted, in bytes.
    pub fn max_dataset_bytes(&self) -> u64 {
        self.max_dataset_mib.saturating_mul(1024 * 1024)
    }

    /// The fault injector asked for, if any.
    pub fn injector(&self) -> Option<crate::fault::Injector> {
        self.fault.map(|f| {
            let i = crate::fault::Injector::new(f, self.fault_seed, Duration::from_millis(self.fault_delay_ms));
            if self.fault_conceal { i.concealing() } else { i }
        })
    }
}
