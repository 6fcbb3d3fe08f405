//! Starting an orchestrator: its actors and its gRPC server, in the current actix System.

use crate::artifacts::{open_store, probe};
use crate::dashboard::{self, DashState};
use crate::data::DataCache;
use crate::events::EventLog;
use crate::job_table::{JobDefaults, JobTable, ResumeActive};
use crate::registry::{HealthPolicy, Registry};
use crate::service::{OrchestratorService, server};
use crate::telemetry::Telemetry;
use actix::{Actor, Addr};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Heartbeat period asked of PNodes unless `serve --heartbeat-ms` says otherwise.
pub const DEFAULT_HEARTBEAT_MS: u64 = 200;
/// Silence after which a PNode is lost, unless `serve --heartbeat-timeout-ms` says otherwise.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 1000;
/// Most PNodes one job spreads over, unless `serve --max-pnodes` says otherwise.
pub const DEFAULT_MAX_PNODES: usize = 16;

/// Orchestrator settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to serve gRPC on (port 0 picks one).
    pub listen: SocketAddr,
    /// Dataset directory (else DCNR_DATA, else the default search list).
    pub data: Option<PathBuf>,
    /// Heartbeat period asked of PNodes.
    pub heartbeat: Duration,
    /// Silence after which a PNode is lost.
    pub heartbeat_timeout: Duration,
    /// Job defaults.
    pub jobs: JobDefaults,
    /// Artifact store URL: a directory, file:///path or s3://bucket/prefix (none: keep nothing).
    pub store: Option<String>,
    /// S3 endpoint for an s3:// store (e.g. http://127.0.0.1:9000 for MinIO).
    pub s3_endpoint: Option<String>,
    /// Token that makes a PNode trusted (none: every PNode is untrusted).
    pub trusted_token: crate::admission::TrustedToken,
    /// Reputation rules.
    pub trust: crate::trust::TrustPolicy,
    /// Address to serve the dashboard, its API and /metrics on (none: no dashboard).
    pub dashboard: Option<SocketAddr>,
    /// Transport security and who may call what.
    pub security: SecurityConfig,
    /// Host names the dashboard answers to besides loopback names and IP literals.
    pub dashboard_hosts: Vec<String>,
    /// This orchestrator's name among those sharing the store (None: the host name and the
    /// address it listens on).
    pub instance: Option<String>,
    /// How long a job's lease lasts unrenewed: another orchestrator sharing the store takes the
    /// job over after this much silence.
    pub lease_term: Duration,
    /// The relay this orchestrator offers PNodes behind NAT (None: none).
    pub relay: Option<RelaySettings>,
    /// The URL peers sharing the store reach this orchestrator at (None: the listen address).
    pub advertise: Option<String>,
}

/// Where a relay listens and how others reach it.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Address to accept relay connections on (port 0 picks one).
    pub listen: SocketAddr,
    /// `host:port` others dial (default: the address listened on).
    pub advertise: Option<String>,
}

impl RelaySettings {
    /// Binds and starts the relay on the current runtime; answers the address to advertise.
    pub async fn start(&self) -> anyhow::Result<String> {
        Ok(dcnr_mesh::relay::start(self.listen, self.advertise.clone()).await?)
    }
}

/// How the orchestrator secures its links (docs/SECURITY.md).
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// The TLS directory (CA, local maintainer token); None: plaintext, no authentication
    /// (local development only).
    pub tls_dir: Option<PathBuf>,
    /// Lifetime of PNode certificates.
    pub cert_lifetime: Duration,
    /// Maintainer tokens accepted besides the local one (their SHA-256 only is kept).
    pub maintainer_tokens: Vec<crate::admission::TrustedToken>,
    /// Whether reads are open to anyone (None: open when listening on loopback only).
    pub open_reads: Option<bool>,
}

impl SecurityConfig {
    /// TLS with the CA in `dir` and the defaults.
    pub fn tls(dir: PathBuf) -> SecurityConfig {
        SecurityConfig {
            tls_dir: Some(dir),
            cert_lifetime: crate::ca::DEFAULT_PNODE_CERT_LIFETIME,
            maintainer_tokens: Vec::new(),
            open_reads: None,
        }
    }
}

/// A running orchestrator.
pub struct ServerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Job table.
    pub jobs: Addr<JobTable>,
    /// PNode registry.
    pub registry: Addr<Registry>,
    /// The gRPC server task.
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Curves, placement and the event log.
    pub telemetry: Telemetry,
    /// Where the dashboard listens, if it was asked for.
    pub dashboard: Option<SocketAddr>,
    /// The mesh CA (None in plaintext mode).
    pub ca: Option<crate::ca::SharedCa>,
}

impl ServerHandle {
    /// The URL PNodes and clients use.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The local maintainer token (None in plaintext mode).
    pub fn maintainer_token(&self) -> Option<String> {
        self.ca.as_ref().and_then(|c| c.local_maintainer_token().ok())
    }

    /// The dashboard's URL, if it runs.
    pub fn dashboard_url(&self) -> Option<String> {
        self.dashboard.map(|a| format!("http://{a}/"))
    }
}

/// Binds, starts the actors and serves; must be called inside an actix System.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<ServerHandle> {
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let ca = match &cfg.security.tls_dir {
        Some(dir) => Some(std::sync::Arc::new(crate::ca::MeshCa::load_or_create(dir)?)),
        None => None,
    };
    let mut maintainers = cfg.security.maintainer_tokens.clone();
    match &ca {
        Some(ca) => {
            // The orchestrator's own calls (to PNodes) present its certificate.
            dcnr_proto::tls::set_client_security(dcnr_proto::tls::ClientSecurity::Tls(ca.tls().clone()));
            let local = ca.local_maintainer_token()?;
            maintainers.extend(crate::admission::TrustedToken::new(&local));
        }
        None => {
            tracing::warn!(
                "plaintext mode: nothing is encrypted and no caller is authenticated (local development only)"
            );
            dcnr_proto::tls::set_client_security(dcnr_proto::tls::ClientSecurity::Plaintext);
        }
    }
    let server_tls = ca.as_ref().map(|c| c.tls().server_config()).transpose()?;
    // The dashboard's reads follow the same rule as the API's, judged by where it listens.
    let dashboard_readers = match (cfg.dashboard, &ca) {
        (Some(at), Some(_)) if !cfg.security.open_reads.unwrap_or(at.ip().is_loopback()) => {
            Some(std::sync::Arc::new(maintainers.clone()))
        }
        _ => None,
    };
    let access = crate::service::Access {
        ca: ca.clone(),
        cert_lifetime: cfg.security.cert_lifetime,
        maintainers,
        open_reads: cfg.security.open_reads.unwrap_or(addr.ip().is_loopback()),
    };
    let (store, recorded) = match &cfg.store {
        Some(url) => {
            let store = open_store(url, cfg.s3_endpoint.as_deref())?;
            // A store that is still starting (a container beside this one) gets a few seconds.
            let mut tries = 0;
            loop {
                match probe(store.as_ref()).await {
                    Ok(()) => break,
                    Err(e) if tries < 4 => {
                        tracing::warn!(store = %url, error = %e, "artifact store not usable yet; retrying");
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e).with_context(|| format!("the artifact store {url} is not usable")),
                }
            }
            let recorded = store
                .list_refs("jobs")
                .await?
                .into_iter()
                .filter_map(|n| n.strip_prefix("jobs/").map(str::to_string))
                .collect();
            (Some(store), recorded)
        }
        None => (None, Default::default()),
    };
    let instance = cfg.instance.clone().unwrap_or_else(|| format!("{}/{addr}", host_name()));
    let mut registry =
        Registry::new(HealthPolicy { interval: cfg.heartbeat, timeout: cfg.heartbeat_timeout }).with_trust(cfg.trust);
    if let Some(store) = &store {
        // Reputation outlives a restart: a quarantined identity stays refused.
        let saved = crate::ledger::load(store.as_ref()).await.context("cannot read the saved trust book")?;
        let quarantined = saved.values().filter(|r| r.quarantined.is_some()).count();
        tracing::info!(identities = saved.len(), quarantined, "trust book loaded");
        registry = registry.with_ledger(store.clone(), instance.clone(), saved);
    }
    let registry = registry.start();
    let telemetry = Telemetry::new(EventLog::default());
    let data = DataCache::new(cfg.data.clone());
    let mut jobs = JobTable::new(registry.clone(), data.clone(), cfg.jobs.clone(), store.clone(), recorded)
        .with_telemetry(telemetry.clone())
        .with_instance(instance.clone());
    if let Some(store) = &store {
        tracing::info!(%instance, term = ?cfg.lease_term, "owning jobs through leases in the store");
        let scheme = if ca.is_some() { "https" } else { "http" };
        let url = cfg.advertise.clone().unwrap_or_else(|| format!("{scheme}://{addr}"));
        jobs = jobs
            .with_leases(crate::lease::Leases::new(store.clone(), instance.clone(), cfg.lease_term).serving_at(url));
    }
    let jobs = jobs.start();
    tokio::spawn(telemetry.clone().watch(registry.clone()));
    // Jobs that were running when a previous orchestrator stopped go on; their placement waits
    // for PNodes to register again.
    jobs.do_send(ResumeActive);
    let dashboard = match cfg.dashboard {
        Some(at) => {
            let state = DashState {
                jobs: jobs.clone(),
                registry: registry.clone(),
                telemetry: telemetry.clone(),
                hosts: std::sync::Arc::new(cfg.dashboard_hosts.clone()),
                readers: dashboard_readers,
                store: store.clone(),
            };
            Some(dashboard::start(at, state).await?)
        }
        None => None,
    };
    let relay = match &cfg.relay {
        Some(r) => Some(r.start().await?),
        None => None,
    };
    let svc = OrchestratorService {
        access: std::sync::Arc::new(access),
        registry: registry.clone(),
        jobs: jobs.clone(),
        heartbeat: cfg.heartbeat,
        telemetry: telemetry.clone(),
        data,
        store: store.clone(),
        relay,
        instance: instance.clone(),
        admission: std::sync::Arc::new(crate::admission::Admission {
            token: cfg.trusted_token.clone(),
            ..Default::default()
        }),
    };
    let incoming = dcnr_proto::transport::incoming(listener, server_tls);
    let task = tokio::spawn(dcnr_proto::transport::server().add_service(server(svc)).serve_with_incoming(incoming));
    tracing::info!(%addr, "orchestrator listening");
    Ok(ServerHandle { addr, jobs, registry, task, telemetry, dashboard, ca })
}

/// This machine's name (for the default instance name), or `localhost` when it cannot be read.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
