//! Which orchestrators to join: the `--orchestrator` list resolved (`dcnr_mesh::discovery`);
//! first the first candidate that answers (with TLS: completes a handshake, and presents the
//! pinned CA when a pin is known), retried until `--connect-timeout-s`.

use crate::config::PnodeArgs;
use anyhow::Context as _;
use dcnr_mesh::discovery::{Candidate, Discovery, Source, parse_sources};
use std::time::{Duration, Instant};

/// `args` with `orchestrator` set to the chosen URL, and `ca_sha256` to the pin DNS published
/// when neither `--ca` nor `--ca-sha256` was given. A single URL is used as it is.
pub async fn choose(args: &PnodeArgs) -> anyhow::Result<PnodeArgs> {
    let patience = args.connect_timeout();
    let sources = parse_sources(&args.orchestrator)?;
    if let [Source::Url(url)] = sources.as_slice() {
        return Ok(PnodeArgs { orchestrator: url.clone(), ..args.clone() });
    }
    let deadline = Instant::now() + patience;
    let mut wait = Duration::from_millis(100);
    loop {
        // Resolved afresh on every round: DNS may change while nothing answers.
        let why = match answering_first(args, &sources, true).await {
            Ok(mut found) if !found.is_empty() => {
                let chosen = found.swap_remove(0);
                tracing::info!(orchestrator = %chosen.orchestrator, pinned = chosen.ca_sha256.is_some(), "joining");
                return Ok(chosen);
            }
            Ok(_) => "no candidate answered".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() + wait >= deadline {
            anyhow::bail!("no orchestrator reachable from `{}`: {why}", args.orchestrator);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Whether the `--orchestrator` value can name more than one orchestrator (a list or a DNS
/// name), so that a PNode joins every one it names and looks them up again now and then.
pub fn names_several(args: &PnodeArgs) -> bool {
    parse_sources(&args.orchestrator).is_ok_and(|s| !matches!(s.as_slice(), [Source::Url(_)]))
}

/// Every orchestrator `args.orchestrator` names that answers now, as `args` to join it with
/// (one lookup, no retries).
pub async fn answering(args: &PnodeArgs) -> anyhow::Result<Vec<PnodeArgs>> {
    let sources = parse_sources(&args.orchestrator)?;
    answering_first(args, &sources, false).await
}

/// The candidates that answer, in discovery order; with `first_only`, stops at the first.
async fn answering_first(args: &PnodeArgs, sources: &[Source], first_only: bool) -> anyhow::Result<Vec<PnodeArgs>> {
    let scheme = if args.insecure_plaintext { "http" } else { "https" };
    let discovery = Discovery::new(args.dns_server)?;
    let found = discovery.candidates(sources, scheme).await?;
    tracing::debug!(candidates = ?found.iter().map(|c| &c.url).collect::<Vec<_>>(), "orchestrators found");
    let mut out = Vec::new();
    for c in &found {
        let chosen = adopt(args, c);
        if answers(&chosen).await {
            out.push(chosen);
            if first_only {
                break;
            }
        }
    }
    Ok(out)
}

fn adopt(args: &PnodeArgs, c: &Candidate) -> PnodeArgs {
    let pin = match (&args.ca, &args.ca_sha256) {
        (None, None) => c.ca_sha256.clone(),
        _ => args.ca_sha256.clone(),
    };
    PnodeArgs { orchestrator: c.url.clone(), ca_sha256: pin, ..args.clone() }
}

/// Whether the orchestrator `args` now names answers (`discovery::answers`); a candidate
/// presenting another CA than the pin is passed over, and said so.
async fn answers(args: &PnodeArgs) -> bool {
    let pin = args.ca_sha256.as_deref().filter(|_| args.ca.is_none());
    match dcnr_mesh::discovery::answers(&args.orchestrator, args.insecure_plaintext, pin).await {
        Ok(()) => true,
        Err(e @ dcnr_mesh::discovery::ProbeError::OtherCa(_)) => {
            tracing::warn!(orchestrator = %args.orchestrator, error = %e, "passing over an orchestrator with another CA");
            false
        }
        Err(_) => false,
    }
}

/// The `--orchestrator` value, checked early so a typo fails before anything else starts.
pub fn check(args: &PnodeArgs) -> anyhow::Result<()> {
    parse_sources(&args.orchestrator).map(|_| ()).context("invalid --orchestrator")
}
