//! Helpers that start real `orchestrator` and `pnode` processes on loopback for the
//! integration tests, and always stop them.

use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary built beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(|d| d.parent()).map(PathBuf::from).unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo test --workspace builds them)",
        path.display()
    );
    path
}

/// The TLS directory every orchestrator this test process starts shares: one mesh CA
/// (`ca.pem`) and one maintainer token, so every CLI call and PNode finds both through
/// `DCNR_TLS_DIR` and `DCNR_CA`. Created by the first `orchestrator serve`.
pub fn tls_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| match tempfile::Builder::new().prefix("dcnr-test-tls-").tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot create a TLS directory for the tests: {e}"),
    })
    .path()
}

/// The mesh CA certificate of this test process's orchestrators.
pub fn ca_file() -> PathBuf {
    tls_dir().join("ca.pem")
}

/// The maintainer token of this test process's orchestrators.
pub fn maintainer_token() -> Result<String> {
    Ok(std::fs::read_to_string(tls_dir().join("maintainer.token"))?.trim().to_string())
}

/// Points a command of ours at the shared TLS directory and CA. The same private directory is
/// its XDG runtime directory: without one, the Wayland client library that software Vulkan
/// (lavapipe, in the GPU tests) loads prints an error for every Vulkan instance.
pub fn secure(cmd: &mut Command) -> &mut Command {
    cmd.env("DCNR_TLS_DIR", tls_dir()).env("DCNR_CA", ca_file()).env("XDG_RUNTIME_DIR", tls_dir())
}

/// Who a test's own gRPC client is.
pub enum Caller {
    /// No certificate.
    Anonymous,
    /// A registered PNode: its id and its certificate.
    Member(String, std::sync::Arc<dcnr_proto::tls::CertSlot>),
}

/// A gRPC channel to `url` (a server that must prove to be `expect`) as `caller`, over TLS with
/// this process's CA.
pub async fn channel(url: &str, expect: dcnr_proto::tls::Expect, caller: &Caller) -> Result<tonic::transport::Channel> {
    let slot = match caller {
        Caller::Anonymous => dcnr_proto::tls::CertSlot::new(),
        Caller::Member(_, slot) => slot.clone(),
    };
    let ca = dcnr_proto::tls::MeshTls::from_ca_file(&ca_file())?;
    let tls = dcnr_proto::tls::MeshTls::new(ca.ca().clone(), slot)?;
    let security = dcnr_proto::tls::ClientSecurity::Tls(tls);
    Ok(dcnr_proto::transport::endpoint_as(url, Some(Duration::from_secs(20)), &expect, Some(&security))?
        .connect()
        .await?)
}

/// An anonymous client of the orchestrator at `url`.
pub async fn orchestrator_client(
    url: &str,
) -> Result<dcnr_proto::v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel>> {
    let c = channel(url, dcnr_proto::tls::Expect::Orchestrator, &Caller::Anonymous).await?;
    Ok(dcnr_proto::v1::orchestrator_client::OrchestratorClient::new(c))
}

/// Registers a fresh identity (key from `seed`) with the orchestrator at `url` as a PNode
/// listening at `endpoint`, the way `pnode` does; returns it as a caller holding its certificate.
pub async fn register_member(url: &str, seed: u8, endpoint: &str) -> Result<Caller> {
    use dcnr_proto::v1;
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let mut orch = orchestrator_client(url).await?;
    let public = key.verifying_key().to_bytes().to_vec();
    let nonce = orch.challenge(v1::ChallengeRequest { public_key: public }).await?.into_inner().nonce;
    let mut req = v1::RegisterRequest {
        protocol_version: dcnr_proto::PROTOCOL_VERSION,
        name: format!("member-{seed}"),
        endpoint: endpoint.to_string(),
        nonce,
        ..Default::default()
    };
    dcnr_proto::identity::sign_registration(&key, &mut req);
    let r = orch.register(req).await?.into_inner();
    let slot = dcnr_proto::tls::CertSlot::new();
    let pkcs8 = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_der(&key).map_err(|e| anyhow!("{e}"))?;
    let chain = r.certificate_chain.into_iter().map(dcnr_proto::tls::CertificateDer::from).collect();
    slot.set(chain, pkcs8.as_bytes())?;
    Ok(Caller::Member(r.pnode_id, slot))
}

/// Path of a fixture file.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Path of a shipped model.
pub fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join(name)
}

/// A child process that is killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An orchestrator process plus PNode processes on loopback.
pub struct Mesh {
    /// Orchestrator URL.
    pub url: String,
    /// The orchestrator's artifact store.
    pub artifacts: tempfile::TempDir,
    /// Dashboard URL (ends in `/`) when `serve` was given `--dashboard`.
    pub dashboard: Option<String>,
    orchestrator: Proc,
    /// The address PNodes listen on.
    ip: String,
    pnodes: Vec<Proc>,
    serve_args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Mesh {
    /// Starts an orchestrator on a free loopback port and `n` PNodes, and waits until all joined.
    pub fn start(n: usize) -> Result<Mesh> {
        Self::start_with(n, &[], &[])
    }

    /// Like [`Mesh::start`], with extra `serve` flags and environment (e.g. an S3 store); the
    /// local artifact directory is used unless the flags name a `--store`.
    pub fn start_with(n: usize, serve_args: &[&str], envs: &[(&str, &str)]) -> Result<Mesh> {
        Self::start_on("127.0.0.1", n, serve_args, envs)
    }

    /// Like [`Mesh::start_with`], with the orchestrator and the PNodes on `ip` (an address of
    /// this machine, such as one end of a veth pair into a test's own network namespace).
    pub fn start_on(ip: &str, n: usize, serve_args: &[&str], envs: &[(&str, &str)]) -> Result<Mesh> {
        let artifacts = tempfile::tempdir()?;
        let (orchestrator, url, dashboard) =
            spawn_orchestrator(&format!("{ip}:0"), artifacts.path(), serve_args, envs)?;
        let mut mesh = Mesh {
            url,
            dashboard,
            artifacts,
            orchestrator,
            ip: ip.to_string(),
            pnodes: Vec::new(),
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        for _ in 0..n {
            mesh.add_pnode()?;
        }
        mesh.wait_for_pnodes(n)?;
        Ok(mesh)
    }

    /// Starts another orchestrator on a free port sharing this mesh's store, TLS directory and
    /// `serve` flags; returns it and its URL.
    pub fn start_peer_orchestrator(&self) -> Result<(Proc, String)> {
        self.start_peer_orchestrator_with_dashboard().map(|(p, url, _)| (p, url))
    }

    /// Like [`Mesh::start_peer_orchestrator`]; also the peer's dashboard URL when the `serve`
    /// flags ask for one.
    pub fn start_peer_orchestrator_with_dashboard(&self) -> Result<(Proc, String, Option<String>)> {
        let args: Vec<&str> = self.serve_args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        spawn_orchestrator("127.0.0.1:0", self.artifacts.path(), &args, &envs)
    }

    /// Kills the orchestrator with SIGKILL (a crash).
    pub fn kill_orchestrator(&mut self) {
        let _ = self.orchestrator.0.kill();
        let _ = self.orchestrator.0.wait();
    }

    /// Starts the orchestrator again on the same address and store (after [`Mesh::kill_orchestrator`]).
    pub fn restart_orchestrator(&mut self) -> Result<()> {
        let listen = self.url.trim_start_matches("https://").to_string();
        let args: Vec<&str> = self.serve_args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old socket may linger a moment after the kill.
        loop {
            match spawn_orchestrator(&listen, self.artifacts.path(), &args, &envs) {
                Ok((p, _, _)) => {
                    self.orchestrator = p;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Sends a signal (e.g. "STOP", "CONT", "TERM") to PNode `i`.
    pub fn signal_pnode(&self, i: usize, signal: &str) -> Result<()> {
        let p = self.pnodes.get(i).ok_or_else(|| anyhow!("no pnode {i}"))?;
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(p.0.id().to_string()).status()?.success();
        if !ok {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// Waits up to `limit` for PNode `i` to exit; its exit code.
    pub fn wait_pnode_exit(&mut self, i: usize, limit: Duration) -> Result<Option<i32>> {
        let p = self.pnodes.get_mut(i).ok_or_else(|| anyhow!("no pnode {i}"))?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = p.0.try_wait()? {
                return Ok(s.code());
            }
            if Instant::now() > deadline {
                bail!("pnode {i} did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The orchestrator's PNode table (`orchestrator pnodes --json`).
    pub fn pnodes(&self) -> Result<Vec<serde_json::Value>> {
        let out = run(&["pnodes", "--json", "--orchestrator", &self.url], Duration::from_secs(10))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Indices of the PNode processes that host VNodes now (by their `--name`).
    pub fn busy_pnodes(&self) -> Result<Vec<usize>> {
        let mut busy: Vec<usize> = self
            .pnodes()?
            .iter()
            .filter(|p| p["hosted_vnodes"].as_u64().unwrap_or(0) > 0 && p["health"] == "healthy")
            .filter_map(|p| p["name"].as_str()?.strip_prefix("test-pnode-")?.parse().ok())
            .collect();
        busy.sort();
        Ok(busy)
    }

    /// A busy PNode (one hosting VNodes) other than those in `not`, waiting up to 10 s for one.
    pub fn victim(&self, not: &[usize]) -> Result<usize> {
        wait_for("a busy pnode to fail", Duration::from_secs(10), || {
            self.busy_pnodes().ok()?.into_iter().find(|i| !not.contains(i))
        })
    }

    /// Submits `job` and waits for it, SIGKILLing a busy PNode once the job reaches `at_step`;
    /// the submitting CLI's output.
    pub fn submit_killing_one(&mut self, job: &std::path::Path, at_step: u64, limit: Duration) -> Result<Output> {
        let f = job.to_string_lossy().to_string();
        let child = self.spawn_cli(&["submit", &f, "--orchestrator", &self.url, "--wait", "--json"])?;
        self.wait_for_step(at_step, limit)?;
        let victim = self.victim(&[])?;
        self.kill_pnode(victim);
        Ok(child.wait_with_output()?)
    }

    /// The job table (`orchestrator jobs --json`), or an error while the orchestrator is down.
    pub fn jobs(&self) -> Result<Vec<serde_json::Value>> {
        let out = run(&["jobs", "--json", "--orchestrator", &self.url], Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("jobs failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Steps done by the only job, waiting until it has at least `step` (or ended).
    pub fn wait_for_step(&self, step: u64, limit: Duration) -> Result<u64> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(jobs) = self.jobs()
                && let Some(j) = jobs.first()
            {
                let done = j["steps_done"].as_u64().unwrap_or(0);
                if done >= step || j["state"] == "succeeded" || j["state"] == "failed" {
                    return Ok(done);
                }
            }
            if Instant::now() > deadline {
                bail!("the job did not reach step {step} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A job's `result.json` from the local artifact store.
    pub fn result(&self, job: &str) -> Result<serde_json::Value> {
        self.artifact(job, "result.json")
    }

    /// A JSON artifact (`result.json`, `verification.json`...) named in a job's record in the
    /// local artifact store.
    pub fn artifact(&self, job: &str, name: &str) -> Result<serde_json::Value> {
        let root = self.artifacts.path();
        let object = |h: &str| -> Result<Vec<u8>> {
            std::fs::read(root.join("objects").join(&h[..2]).join(h)).with_context(|| format!("object {h}"))
        };
        let h = std::fs::read_to_string(root.join("refs/jobs").join(job)).context("job record ref")?;
        let rec: serde_json::Value = serde_json::from_slice(&object(h.trim())?)?;
        let r = rec["artifacts"][name].as_str().ok_or_else(|| anyhow!("no {name} in {rec}"))?;
        Ok(serde_json::from_slice(&object(r)?)?)
    }
}

/// Starts `orchestrator serve` on `listen` with a local store at `store` (unless the flags name
/// one); returns it, its URL and its dashboard URL (with `--dashboard`) once it has printed them.
fn spawn_orchestrator(
    listen: &str,
    store: &std::path::Path,
    serve_args: &[&str],
    envs: &[(&str, &str)],
) -> Result<(Proc, String, Option<String>)> {
    {
        let mut cmd = Command::new(bin("orchestrator"));
        secure(&mut cmd);
        cmd.args(["serve", "--listen", listen, "--step-deadline-s", "60"]);
        if !serve_args.contains(&"--store") {
            cmd.arg("--store").arg(store);
        }
        let mut child = cmd
            .args(serve_args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", std::env::var("DCNR_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start orchestrator")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let orchestrator = Proc(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                let _ = tx.send(l);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).context("orchestrator did not report its address")?;
        let url = line.rsplit(' ').next().unwrap_or_default().to_string();
        if !url.starts_with(&format!("https://{}:", listen.rsplit_once(':').map_or("", |h| h.0))) {
            bail!("unexpected first line from orchestrator: {line}");
        }
        let dashboard = if serve_args.contains(&"--dashboard") {
            let line = rx.recv_timeout(Duration::from_secs(10)).context("orchestrator did not report its dashboard")?;
            let d = line.strip_prefix("dashboard at ").unwrap_or_default().to_string();
            if !d.starts_with("http://127.0.0.1:") {
                bail!("unexpected dashboard line from orchestrator: {line}");
            }
            Some(d)
        } else {
            None
        };
        Ok((orchestrator, url, dashboard))
    }
}

impl Mesh {
    /// Starts one more PNode.
    pub fn add_pnode(&mut self) -> Result<()> {
        self.add_pnode_with(&[])
    }

    /// Starts one more PNode with extra flags.
    pub fn add_pnode_with(&mut self, extra: &[&str]) -> Result<()> {
        let url = self.url.clone();
        self.add_pnode_joining(&url, extra)
    }

    /// Starts one more PNode with extra flags, joining the orchestrators `orchestrator` names
    /// (a URL, a comma-separated list, or `dns:NAME`).
    pub fn add_pnode_joining(&mut self, orchestrator: &str, extra: &[&str]) -> Result<()> {
        let listen = format!("{}:0", self.ip);
        self.add_pnode_in(&[], orchestrator, &listen, extra)
    }

    /// Starts one more PNode listening on `listen`, its command line prefixed by `wrapper`
    /// (e.g. `ip netns exec NS`, to run it in a network namespace of the test's own).
    pub fn add_pnode_in(&mut self, wrapper: &[&str], orchestrator: &str, listen: &str, extra: &[&str]) -> Result<()> {
        // Named by index unless the caller names it.
        let name = format!("test-pnode-{}", self.pnodes.len());
        let naming: &[&str] = if extra.contains(&"--name") { &[] } else { &["--name", &name] };
        let pnode = bin("pnode");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&pnode);
                c
            }
            None => Command::new(&pnode),
        };
        let child = secure(&mut cmd)
            .args(["--orchestrator", orchestrator, "--listen", listen, "--orphan-timeout-s", "20"])
            .args(naming)
            .args(extra)
            .env("RUST_LOG", std::env::var("DCNR_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start pnode")?;
        self.pnodes.push(Proc(child));
        Ok(())
    }

    /// Waits until `n` PNodes are healthy.
    pub fn wait_for_pnodes(&mut self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run(&["pnodes", "--json", "--orchestrator", &self.url], Duration::from_secs(10))?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let healthy = v.as_array().map(|a| a.iter().filter(|p| p["health"] == "healthy").count()).unwrap_or(0);
            if healthy >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {healthy} of {n} pnodes joined");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Submits a graph and waits; returns the JSON summary.
    pub fn submit_wait(&self, graph: &std::path::Path, extra: &[&str]) -> Result<serde_json::Value> {
        let out = self.submit_raw(graph, extra)?;
        if !out.status.success() {
            bail!("submit failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        last_json(&out.stdout)
    }

    /// Submits and waits; returns the process output whatever the outcome.
    pub fn submit_raw(&self, graph: &std::path::Path, extra: &[&str]) -> Result<Output> {
        let g = graph.to_string_lossy().to_string();
        let mut args = vec!["submit", g.as_str(), "--orchestrator", &self.url, "--wait", "--json"];
        args.extend_from_slice(extra);
        run(&args, Duration::from_secs(240))
    }

    /// Kills PNode `i` with SIGKILL (a crash, not a graceful leave).
    pub fn kill_pnode(&mut self, i: usize) {
        if let Some(p) = self.pnodes.get_mut(i) {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }

    /// Starts `orchestrator ARGS` in the background, killed when dropped.
    pub fn spawn_cli(&self, args: &[&str]) -> Result<Child> {
        secure(&mut Command::new(bin("orchestrator")))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start orchestrator client")
    }

    /// Whether the orchestrator is still running.
    pub fn orchestrator_alive(&mut self) -> bool {
        matches!(self.orchestrator.0.try_wait(), Ok(None))
    }
}

/// The state and steps done of `job` as the orchestrator at `url` lists it (`None`: not listed,
/// or the orchestrator does not answer).
pub fn job_state(url: &str, job: &str) -> Option<(String, u64)> {
    let out = run(&["jobs", "--json", "--orchestrator", url], Duration::from_secs(10)).ok()?;
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let j = jobs.as_array()?.iter().find(|j| j["job_id"] == job)?;
    Some((j["state"].as_str()?.to_string(), j["steps_done"].as_u64()?))
}

/// A loopback port that was free a moment ago (another process may take it before use).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET url` with a timeout; returns the status and the body, whatever the status.
pub fn http_get(url: &str) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(url).call().with_context(|| format!("GET {url}"))?;
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().with_context(|| format!("body of {url}"))?;
    Ok((status, body))
}

/// `GET url` that must answer 200 with JSON.
pub fn get_json(url: &str) -> Result<serde_json::Value> {
    let (status, body) = http_get(url)?;
    if status != 200 {
        bail!("GET {url}: {status} {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON: {body}"))
}

/// Polls `f` every 100 ms until it returns `Some` or `limit` passes.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The JSON object on the last line of `stdout`.
pub fn last_json(stdout: &[u8]) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().last().ok_or_else(|| anyhow!("no output"))?;
    serde_json::from_str(line).with_context(|| format!("last line is not JSON: {line}"))
}

/// Runs `orchestrator ARGS` to completion within `limit`, killing it past the limit.
pub fn run(args: &[&str], limit: Duration) -> Result<Output> {
    run_bin("orchestrator", args, limit)
}

/// Runs a workspace binary to completion within `limit`.
pub fn run_bin(name: &str, args: &[&str], limit: Duration) -> Result<Output> {
    run_bin_env(name, args, &[], limit)
}

/// Runs a workspace binary with extra environment variables to completion within `limit`.
pub fn run_bin_env(name: &str, args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Result<Output> {
    let mut child = secure(&mut Command::new(bin(name)))
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {name}"))?;
    let mut so = child.stdout.take().ok_or_else(|| anyhow!("stdout"))?;
    let mut se = child.stderr.take().ok_or_else(|| anyhow!("stderr"))?;
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: t1.join().unwrap_or_default(), stderr: t2.join().unwrap_or_default() })
}

/// Hex SHA-256 of bytes (computed here independently of the code under test).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A real S3-compatible server (s3s-fs) on a free loopback port, serving a temporary directory.
pub struct S3Server {
    /// Endpoint URL.
    pub endpoint: String,
    /// Root directory: one subdirectory per bucket, one file per object.
    pub root: tempfile::TempDir,
    _proc: Proc,
}

/// Access key the test server accepts.
pub const S3_KEY: &str = "dcnrtestkey";
/// Secret key the test server accepts.
pub const S3_SECRET: &str = "dcnrtestsecret";

impl S3Server {
    /// Starts s3s-fs with bucket directories `buckets` already created.
    pub fn start(buckets: &[&str]) -> Result<S3Server> {
        let exe = find_s3s_fs()?;
        let root = tempfile::tempdir()?;
        for b in buckets {
            std::fs::create_dir_all(root.path().join(b))?;
        }
        // The port is chosen by binding and releasing it, so another process may take it first;
        // a start only counts when s3s-fs itself answers HTTP/1.1 on it.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = Command::new(&exe)
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--access-key",
                    S3_KEY,
                    "--secret-key",
                    S3_SECRET,
                ])
                .arg(root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start s3s-fs")?;
            let mut proc = Proc(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if !matches!(proc.0.try_wait(), Ok(None)) {
                    break;
                }
                if speaks_http1(port) {
                    return Ok(S3Server { endpoint: format!("http://127.0.0.1:{port}"), root, _proc: proc });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = proc.0.kill();
        }
        bail!("s3s-fs did not start")
    }

    /// Stops the server (S3 goes down).
    pub fn kill(&mut self) {
        let _ = self._proc.0.kill();
        let _ = self._proc.0.wait();
    }

    /// Environment with the server's credentials.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        vec![("AWS_ACCESS_KEY_ID", S3_KEY), ("AWS_SECRET_ACCESS_KEY", S3_SECRET), ("AWS_REGION", "us-east-1")]
    }
}

fn speaks_http1(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    if c.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    matches!(c.read(&mut buf), Ok(n) if n >= 7 && &buf[..7] == b"HTTP/1.")
}

fn find_s3s_fs() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/s3s-fs"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/s3s-fs"));
    }
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        anyhow!(
            "s3s-fs not found: install it with `cargo install s3s-fs@0.14.1 --locked --features binary` (.ci/run does)"
        )
    })
}
