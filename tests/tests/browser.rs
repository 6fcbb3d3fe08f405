//! The dashboard in a real headless Chromium (driven through chromedriver) during a real
//! training run: the loss chart gains points over time, PNodes and placement are shown, a
//! PNode name made of markup stays text, and a screenshot is kept as a test artifact.

use dcnr_tests::{Mesh, Proc, fixture, free_port, http_get, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A PNode name that would run script if the page ever treated names as HTML.
const HOSTILE_NAME: &str = "<img src=x onerror=\"document.title='pwned'\">";

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.exists()))
}

/// Where screenshots go: `target/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    target.join("test-artifacts")
}

/// chromedriver on a free loopback port, stopped when dropped.
fn start_chromedriver() -> (Proc, String) {
    let driver = which("chromedriver").expect("chromedriver is missing: apt-get install chromium chromium-driver");
    for _ in 0..5 {
        let port = free_port().unwrap();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let proc = Proc(child);
        let url = format!("http://127.0.0.1:{port}");
        let ready = wait_for("chromedriver to answer", Duration::from_secs(15), || {
            http_get(&format!("{url}/status")).ok().filter(|(s, _)| *s == 200).map(|_| ())
        });
        if ready.is_ok() {
            return (proc, url);
        }
    }
    panic!("chromedriver did not start");
}

/// An attribute of the first element matching `css`, read in one script: the page re-renders on
/// every push, so an element handle could go stale between two WebDriver calls.
async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    let script = "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;";
    let v = c.execute(script, vec![css.into(), name.into()]).await.ok()?;
    v.as_str().map(str::to_string)
}

async fn poll<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_curves_pnodes_and_placement_in_chromium() {
    let chromium = which("chromium").expect("chromium is missing: apt-get install chromium chromium-driver");
    let (_driver, driver_url) = start_chromedriver();
    // Chromium's start takes both cores for a moment; a PNode must not count as lost meanwhile
    // (the join events are counted below).
    let serve = ["--dashboard", "127.0.0.1:0", "--heartbeat-timeout-ms", "10000"];
    let mut mesh = Mesh::start_with(1, &serve, &[]).unwrap();
    mesh.add_pnode_with(&["--name", HOSTILE_NAME]).unwrap();
    mesh.wait_for_pnodes(2).unwrap();
    let dash = mesh.dashboard.clone().unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1500",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver_url)
        .await
        .expect("a chromium session");
    // The browser is up before the job starts, so the page sees the run from its beginning.
    let _job = Proc(
        mesh.spawn_cli(&[
            "submit",
            fixture("tiny-mlp.toml").to_str().unwrap(),
            "--orchestrator",
            &mesh.url,
            "--steps",
            "6000",
            "--wait",
        ])
        .unwrap(),
    );
    c.goto(&dash).await.unwrap();

    // The job is picked and its loss curve grows while training runs: by server push, the
    // page never reloads.
    let points =
        |c: Client| async move { attr(&c, "#loss-chart", "data-points").await.and_then(|v| v.parse::<usize>().ok()) };
    let first = poll("loss points", Duration::from_secs(60), || {
        let c = c.clone();
        async move { points(c).await.filter(|n| *n >= 2) }
    })
    .await;
    let more = poll("more loss points", Duration::from_secs(30), || {
        let c = c.clone();
        async move { points(c).await.filter(|n| *n >= first + 3) }
    })
    .await;
    assert!(more > first);
    let polyline = attr(&c, "#loss-chart polyline.train", "points").await.unwrap_or_default();
    assert!(polyline.split(' ').count() >= more, "the curve is drawn: {polyline}");
    assert!(attr(&c, "#acc-chart", "data-points").await.unwrap_or_default().parse::<usize>().unwrap_or(0) >= 2);

    // The page re-renders on every push, so the DOM is read in one script each time (element
    // handles could go stale between two WebDriver calls).
    let js = |c: Client, script: &'static str| async move { c.execute(script, vec![]).await.unwrap() };

    // Mesh view: both PNodes with their health; the hostile name is shown as text.
    let rows = js(
        c.clone(),
        "return Array.from(document.querySelectorAll('#pnodes tbody tr')).map(r => [r.getAttribute('data-pnode'), r.innerText])",
    )
    .await;
    let rows = rows.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut pnode_ids = Vec::new();
    for r in &rows {
        pnode_ids.push(r[0].as_str().unwrap_or_default().to_string());
        let text = r[1].as_str().unwrap_or_default();
        assert!(text.contains("healthy"), "{text}");
        assert!(text.contains("direct"), "reached directly, so said: {text}");
    }
    let names = js(
        c.clone(),
        "return Array.from(document.querySelectorAll('#pnodes tbody td:nth-child(2)')).map(c => c.innerText)",
    )
    .await;
    let names: Vec<String> =
        names.as_array().cloned().unwrap_or_default().iter().filter_map(|n| n.as_str().map(str::to_string)).collect();
    assert!(names.iter().any(|n| n == HOSTILE_NAME), "the name is shown verbatim: {names:?}");
    assert!(c.find_all(Locator::Css("#pnodes img, #graph img")).await.unwrap().is_empty(), "no markup was injected");
    assert_ne!(c.title().await.unwrap(), "pwned");

    // Placement: every VNode of the graph on one of those PNodes, with its step.
    let vnodes = poll("placed VNodes", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let v = c
                .execute(
                    "return Array.from(document.querySelectorAll('#graph .vnode')).map(v => [v.getAttribute('data-pnode'), v.innerText])",
                    vec![],
                )
                .await
                .ok()?;
            let v = v.as_array().cloned().unwrap_or_default();
            (v.len() == 4).then_some(v)
        }
    })
    .await;
    for v in &vnodes {
        let host = v[0].as_str().unwrap_or_default().to_string();
        assert!(pnode_ids.contains(&host), "VNode placed on {host:?}, not one of {pnode_ids:?}");
        assert!(v[1].as_str().unwrap_or_default().contains("step "), "{v:?}");
    }
    let hosted = js(c.clone(), "return document.querySelector('#pnodes tbody').innerText").await;
    let hosted = hosted.as_str().unwrap_or_default();
    assert!(hosted.contains("fc1") && hosted.contains("loss"), "PNodes list their VNodes: {hosted}");

    // Events timeline: the joins and the job's start are there.
    let joined =
        js(c.clone(), "return document.querySelectorAll(\"#events li[data-kind='pnode_joined']\").length").await;
    assert_eq!(joined.as_u64(), Some(2));
    let placed = js(c.clone(), "return document.querySelectorAll(\"#events li[data-kind='job_placed']\").length").await;
    assert!(placed.as_u64().unwrap_or(0) > 0);
    assert_eq!(js(c.clone(), "return document.querySelector('#conn').innerText").await.as_str(), Some("live"));

    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    // Closing can race chromedriver tearing the window down; the checks above are what count.
    let _ = c.close().await;
}
