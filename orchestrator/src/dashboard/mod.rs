//! The researcher dashboard: a web page, the JSON API behind it, a server-sent event stream for
//! live updates, and Prometheus `/metrics`, all on one HTTP address (`serve --dashboard`).
//!
//! The page's HTML, JavaScript and CSS are compiled into the binary, so it works with no network
//! beyond the orchestrator. The API is documented in docs/DASHBOARD.md. Handlers only gather
//! values from the actors and the telemetry and hand them to [`views`], which builds the JSON.

pub mod views;

use crate::events::EventLog;
use crate::job_table::{Get, JobTable, List};
use crate::metrics::ORCHESTRATOR;
use crate::registry::{ListPNodes, PNodeView, Registry};
use crate::status::JobStatus;
use crate::telemetry::{Telemetry, Update};
use actix::Addr;
use anyhow::Context as _;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Only the binary's own assets may run or load; the page builds its DOM with `textContent`,
/// and this policy stops any injected markup from running script even if that ever slipped.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Most events one `/api/events` call returns.
pub const MAX_EVENTS_PER_CALL: usize = 1000;

/// How often the stream pushes the jobs list, the mesh and the watched job.
pub const SNAPSHOT_PERIOD: Duration = Duration::from_secs(1);

/// What the handlers read from.
#[derive(Clone)]
pub struct DashState {
    /// Job table.
    pub jobs: Addr<JobTable>,
    /// PNode registry.
    pub registry: Addr<Registry>,
    /// Curves, placement, rates and the event log.
    pub telemetry: Telemetry,
    /// Host names the dashboard answers to besides loopback names and IP literals.
    pub hosts: std::sync::Arc<Vec<String>>,
    /// Maintainer tokens one of which every request must carry (None: reads are open).
    pub readers: Option<std::sync::Arc<Vec<crate::admission::TrustedToken>>>,
    /// The store shared with peer orchestrators, whose running jobs it lists too.
    pub store: Option<std::sync::Arc<dyn crate::artifacts::ObjectStore>>,
}

/// Cookie that carries the token after a first visit with `?token=`.
const TOKEN_COOKIE: &str = "dcnr_token";

/// The token a request presents: `Authorization: Bearer`, the cookie, or `?token=` (the last
/// also answered with the cookie, so the page's own requests carry it).
fn presented_token(req: &axum::extract::Request) -> (Option<String>, bool) {
    let headers = req.headers();
    if let Some(t) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return (Some(t.strip_prefix("Bearer ").unwrap_or(t).to_string()), false);
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(TOKEN_COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_string));
    if cookie.is_some() {
        return (cookie, false);
    }
    let query = req.uri().query().unwrap_or_default();
    let from_query = query.split('&').find_map(|kv| kv.strip_prefix("token=").map(str::to_string));
    let set = from_query.is_some();
    (from_query, set)
}

/// Whether a request's `Host` header names this dashboard: a loopback name, an IP literal, or a
/// name the operator allowed (`serve --dashboard-host`). A page on another site that rebinds
/// its DNS name to this machine sends its own name, and is refused.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(n, port)| if port.parse::<u16>().is_ok() { n } else { host }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok()
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(&name))
}

async fn check_host(State(s): State<DashState>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    if host_allowed(host, &s.hosts) {
        let Some(readers) = &s.readers else { return next.run(req).await };
        let (token, set_cookie) = presented_token(&req);
        let Some(token) = token.filter(|t| readers.iter().any(|r| r.check(t) == crate::admission::TokenCheck::Matches))
        else {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs a maintainer token: open it once as /?token=TOKEN".into(),
            )
            .into_response();
        };
        let mut response = next.run(req).await;
        if set_cookie && let Ok(v) = format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/").parse() {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
        response
    } else {
        let shown: String = host.chars().take(100).collect();
        ApiError(StatusCode::MISDIRECTED_REQUEST, format!("this dashboard does not answer to host `{shown}`"))
            .into_response()
    }
}

/// An API failure, answered as JSON `{"error": ...}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn unavailable<E: std::fmt::Display>(e: E) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("orchestrator actor unavailable: {e}"))
}

impl DashState {
    fn events(&self) -> &EventLog {
        self.telemetry.events()
    }

    /// This orchestrator's jobs, then those running on peers sharing the store (their owners'
    /// live status).
    async fn jobs(&self) -> Result<Vec<JobStatus>, ApiError> {
        let mut jobs = self.jobs.send(List).await.map_err(unavailable)?;
        if let Some(store) = &self.store {
            let here: std::collections::BTreeSet<String> = jobs.iter().map(|j| j.job_id.clone()).collect();
            let elsewhere = crate::peers::running_elsewhere(store.as_ref(), &here).await;
            jobs.extend(elsewhere.into_iter().map(crate::peers::status_from_wire));
        }
        Ok(jobs)
    }

    /// A job this orchestrator does not hold: ended (its record) or running on a peer (asked).
    async fn elsewhere(&self, id: &str) -> Result<JobStatus, ApiError> {
        let not_found = || ApiError(StatusCode::NOT_FOUND, format!("no job {id}"));
        let Some(store) = &self.store else { return Err(not_found()) };
        let found = crate::elsewhere::find(store.as_ref(), id)
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the shared artifact store: {e}")))?;
        match found {
            Some(crate::elsewhere::Elsewhere::Ended(s)) => Ok(*s),
            Some(crate::elsewhere::Elsewhere::Running { owner, url }) => {
                crate::peers::get_job(&url, id).await.map(crate::peers::status_from_wire).map_err(|e| {
                    ApiError(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "job {id} runs on orchestrator {owner:?} ({url}), which does not answer: {}",
                            e.message()
                        ),
                    )
                })
            }
            None => Err(not_found()),
        }
    }

    async fn pnodes(&self) -> Result<Vec<PNodeView>, ApiError> {
        self.registry.send(ListPNodes).await.map_err(unavailable)
    }

    async fn overview(&self) -> Result<serde_json::Value, ApiError> {
        let (jobs, pnodes) = (self.jobs().await?, self.pnodes().await?);
        Ok(self.telemetry.read(|t| {
            serde_json::json!({
                "jobs": views::job_rows(&jobs, t),
                "pnodes": views::pnode_rows(&pnodes, t),
                "last_event_seq": self.events().last_seq(),
            })
        }))
    }

    async fn job(&self, id: &str, since: u64) -> Result<views::JobDetail, ApiError> {
        let status = match self.jobs.send(Get(id.to_string())).await.map_err(unavailable)? {
            Some(s) => s,
            None => self.elsewhere(id).await?,
        };
        let pnodes = self.pnodes().await?;
        Ok(self.telemetry.read(|t| views::job_detail(&status, t.jobs.get(id), &pnodes, since)))
    }
}

/// The dashboard's routes over `state`.
pub fn router(state: DashState) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/api/overview", get(overview))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/pnodes", get(pnodes))
        .route("/api/events", get(events))
        .route("/api/stream", get(stream))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn overview(State(s): State<DashState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(s.overview().await?))
}

async fn jobs(State(s): State<DashState>) -> Result<Json<Vec<views::JobRow>>, ApiError> {
    let jobs = s.jobs().await?;
    Ok(Json(s.telemetry.read(|t| views::job_rows(&jobs, t))))
}

/// `?since=SEQ`: only training points after that one.
#[derive(Debug, serde::Deserialize)]
struct JobQuery {
    #[serde(default)]
    since: u64,
}

async fn job(
    State(s): State<DashState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Json<views::JobDetail>, ApiError> {
    Ok(Json(s.job(&id, q.since).await?))
}

async fn pnodes(State(s): State<DashState>) -> Result<Json<Vec<views::PNodeRow>>, ApiError> {
    let pnodes = s.pnodes().await?;
    Ok(Json(s.telemetry.read(|t| views::pnode_rows(&pnodes, t))))
}

/// `?since=SEQ&limit=N&job=ID`.
#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
    job: Option<String>,
}

async fn events(State(s): State<DashState>, Query(q): Query<EventsQuery>) -> Json<Vec<crate::events::Event>> {
    let limit = q.limit.unwrap_or(MAX_EVENTS_PER_CALL).min(MAX_EVENTS_PER_CALL);
    Json(s.events().since(q.since, limit, q.job.as_deref()))
}

async fn metrics(State(s): State<DashState>) -> Result<Response, ApiError> {
    let (jobs, pnodes) = (s.jobs().await?, s.pnodes().await?);
    let rates = s.telemetry.read(|t| t.pnodes.clone());
    let text = ORCHESTRATOR.render(&jobs, &pnodes, &rates);
    Ok(([(header::CONTENT_TYPE, dcnr_mesh::exposition::CONTENT_TYPE)], text).into_response())
}

/// `?job=ID`: also push that job's detail (without curves) every second.
#[derive(Debug, serde::Deserialize)]
struct StreamQuery {
    job: Option<String>,
}

fn sse_json(name: &str, value: &impl serde::Serialize) -> Option<SseEvent> {
    SseEvent::default().event(name).json_data(value).ok()
}

/// Server-sent events: `event` (mesh events), `train` and `test` (curve points), `overview`
/// and `job` (snapshots every second), `resync` (the client fell behind and should refetch).
async fn stream(
    State(s): State<DashState>,
    Query(q): Query<StreamQuery>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    let mut events = s.events().subscribe();
    let mut updates = s.telemetry.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SNAPSHOT_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let out = tokio::select! {
                e = events.recv() => match e {
                    Ok(e) => sse_json("event", &e),
                    Err(RecvError::Lagged(_)) => Some(SseEvent::default().event("resync").data("events")),
                    Err(RecvError::Closed) => return,
                },
                u = updates.recv() => match u {
                    Ok(u) => {
                        let (name, job) = match &u {
                            Update::Train { job, .. } => ("train", job),
                            Update::Test { job, .. } => ("test", job),
                        };
                        if q.job.as_ref().is_some_and(|j| j != job) {
                            continue;
                        }
                        sse_json(name, &u)
                    }
                    Err(RecvError::Lagged(_)) => Some(SseEvent::default().event("resync").data("curves")),
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    if let Ok(o) = s.overview().await
                        && let Some(e) = sse_json("overview", &o)
                        && tx.send(e).await.is_err()
                    {
                        return;
                    }
                    match &q.job {
                        Some(id) => match s.job(id, u64::MAX).await {
                            Ok(d) => sse_json("job", &d),
                            Err(_) => None,
                        },
                        None => None,
                    }
                }
                _ = tx.closed() => return,
            };
            if let Some(e) = out
                && tx.send(e).await.is_err()
            {
                return;
            }
        }
    });
    let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok::<SseEvent, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Binds `addr` and serves the dashboard in the background; returns the bound address.
pub async fn start(addr: SocketAddr, state: DashState) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the dashboard on {addr}"))?;
    let local = listener.local_addr()?;
    let app = router(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "dashboard server stopped");
        }
    });
    tracing::info!(%local, "dashboard listening");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_local_names_ip_literals_and_allowed_names_pass() {
        let allowed = vec!["dash.example.org".to_string()];
        for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080", "10.0.0.7:80", "dash.example.org:443"]
        {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in ["evil.example.com:8080", "", "localhost.evil.com", "127.0.0.1.evil.com:8080"] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }
}
