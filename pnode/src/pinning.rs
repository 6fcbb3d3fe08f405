//! How this PNode comes to trust the orchestrator: a CA file, a pinned fingerprint, or trust on
//! first use kept in the data directory (docs/SECURITY.md weighs the three).

use crate::config::PnodeArgs;
use anyhow::Context as _;
use dcnr_proto::tls::{CertSlot, ClientSecurity, MeshTls, check_pin, fetch_server_ca, set_client_security, to_pem};
use std::path::Path;

/// File in the data directory holding the CA trusted on first use.
const TOFU_FILE: &str = "orchestrator-ca.pem";

/// Sets this process's client security from the flags; returns the mesh TLS settings (None in
/// plaintext mode), whose identity slot receives the certificate issued at registration.
pub async fn setup(args: &PnodeArgs) -> anyhow::Result<Option<MeshTls>> {
    if args.insecure_plaintext {
        tracing::warn!("plaintext mode: nothing is encrypted and no caller is authenticated (local development only)");
        set_client_security(ClientSecurity::Plaintext);
        return Ok(None);
    }
    if args.orchestrator.starts_with("http://") {
        anyhow::bail!(
            "`{}` is plaintext; the mesh speaks TLS (https://). Plaintext is for local development only: pass --insecure-plaintext to every process",
            args.orchestrator
        );
    }
    let slot = CertSlot::new();
    let tls = match (&args.ca, &args.ca_sha256) {
        (Some(file), _) => {
            let t = MeshTls::from_ca_file(file)?;
            MeshTls::new(t.ca().clone(), slot)?
        }
        (None, Some(pin)) => {
            let ca = fetch_ca(&args.orchestrator, args).await?;
            check_pin(&ca, pin)?;
            MeshTls::new(ca, slot)?
        }
        (None, None) => trust_on_first_use(args, slot).await?,
    };
    set_client_security(ClientSecurity::Tls(tls.clone()));
    Ok(Some(tls))
}

async fn fetch_ca(url: &str, args: &PnodeArgs) -> anyhow::Result<dcnr_proto::tls::CertificateDer<'static>> {
    // The orchestrator may still be starting.
    let deadline = std::time::Instant::now() + args.connect_timeout();
    loop {
        match fetch_server_ca(url).await {
            Ok(ca) => return Ok(ca),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "orchestrator not reachable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot reach orchestrator at {url} to read its CA")),
        }
    }
}

async fn trust_on_first_use(args: &PnodeArgs, slot: std::sync::Arc<CertSlot>) -> anyhow::Result<MeshTls> {
    let kept = args.data_dir.as_deref().map(|d| d.join(TOFU_FILE));
    if let Some(file) = kept.as_deref().filter(|f| f.exists()) {
        let t = MeshTls::from_ca_file(file)?;
        return Ok(MeshTls::new(t.ca().clone(), slot)?);
    }
    let ca = fetch_ca(&args.orchestrator, args).await?;
    let tls = MeshTls::new(ca, slot)?;
    match kept {
        Some(file) => {
            write_private(&file, to_pem(tls.ca()).as_bytes())?;
            tracing::warn!(
                ca_sha256 = %tls.ca_sha256(),
                kept = %file.display(),
                "trusting the orchestrator's CA on first use; pass --ca-sha256 to pin it instead"
            );
        }
        None => tracing::warn!(
            ca_sha256 = %tls.ca_sha256(),
            "trusting the orchestrator's CA without a pin and without --data-dir to remember it; pass --ca or --ca-sha256"
        ),
    }
    Ok(tls)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
