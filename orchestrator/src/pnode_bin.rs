//! Where a local mesh ([`crate::demo::LocalMesh`]) finds the `pnode` executable it starts.
//!
//! The orchestrator does not link the PNode runtime (docs/ARCHITECTURE.md), so its local meshes
//! run the real `pnode` binary: the one named by `--pnode-bin` or `DCNR_PNODE_BIN`, else the one
//! built beside this executable. `cargo run --bin orchestrator` builds only the orchestrator, so
//! when it started us, `pnode` is built (or brought up to date) with the same cargo and profile
//! first; otherwise a missing `pnode` is an error that says how to build it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the `pnode` executable.
pub const ENV: &str = "DCNR_PNODE_BIN";

/// Why no `pnode` executable could be found.
#[derive(Debug, thiserror::Error)]
pub enum PnodeBinError {
    /// The executable named by the flag or the environment does not exist.
    #[error("pnode executable {0} does not exist (named by --pnode-bin or {ENV})")]
    NotFound(PathBuf),
    /// No `pnode` beside this executable, and none was built there.
    #[error(
        "no pnode executable at {0}: build it with `cargo build --release` (or `cargo build --release -p dcnr-pnode`), \
         or name one with --pnode-bin or {ENV}"
    )]
    Missing(PathBuf),
    /// This executable's own path is unknown, so nothing can be beside it.
    #[error("cannot find this executable to look for pnode beside it: {0}")]
    CurrentExe(std::io::Error),
    /// Building `pnode` with the cargo that ran us failed.
    #[error("{command} failed ({detail}); build pnode yourself with `cargo build --release`")]
    Build {
        /// The command line that was run.
        command: String,
        /// Its exit status or why it did not start.
        detail: String,
    },
}

/// The `pnode` executable to start: `explicit` (the flag), else `DCNR_PNODE_BIN`, else the one
/// beside this executable, built first when `cargo run` started this package.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, PnodeBinError> {
    let named =
        explicit.map(Path::to_path_buf).or_else(|| std::env::var_os(ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
    if let Some(p) = named {
        return if p.is_file() { Ok(p) } else { Err(PnodeBinError::NotFound(p)) };
    }
    let exe = std::env::current_exe().map_err(PnodeBinError::CurrentExe)?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // A test executable lives one level below the binaries, in `deps/`.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    if let Some(cargo) = started_by_cargo() {
        build_with_cargo(&cargo, &dir)?;
    }
    let path = dir.join(format!("pnode{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() { Ok(path) } else { Err(PnodeBinError::Missing(path)) }
}

/// The cargo that ran this package (`cargo run`, or this package's tests), if one did.
fn started_by_cargo() -> Option<OsString> {
    let ours = std::env::var_os("CARGO_PKG_NAME").is_some_and(|n| n == env!("CARGO_PKG_NAME"));
    let cargo = std::env::var_os("CARGO")?;
    // The manifest must still be there: an installed binary may inherit a stale environment.
    let manifest = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    (ours && manifest.is_file()).then_some(cargo)
}

/// Runs `cargo build --bin pnode` into `bin_dir`, a profile directory of a target
/// directory (`target/release`), with that profile; a no-op when `pnode` is up to date.
fn build_with_cargo(cargo: &OsString, bin_dir: &Path) -> Result<(), PnodeBinError> {
    let (Some(profile_dir), Some(target_dir)) = (bin_dir.file_name(), bin_dir.parent()) else {
        return Ok(());
    };
    let profile = match profile_dir.to_string_lossy().as_ref() {
        "debug" => "dev".to_string(),
        p => p.to_string(),
    };
    let manifest = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default()).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    // Selecting the orchestrator too resolves dependency features as `cargo run` just did, so
    // the dependencies it built are reused instead of compiled again for pnode alone.
    cmd.args(["build", "-p", "dcnr-orchestrator", "-p", "dcnr-pnode", "--bin", "pnode", "--profile", &profile])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    let command = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(PnodeBinError::Build { command, detail: s.to_string() }),
        Err(e) => Err(PnodeBinError::Build { command, detail: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_executable_that_does_not_exist_is_an_error_naming_it() {
        let err = locate(Some(Path::new("/nonexistent/pnode"))).unwrap_err();
        assert!(matches!(err, PnodeBinError::NotFound(_)));
        assert!(err.to_string().contains("/nonexistent/pnode"), "{err}");
    }

    #[test]
    fn a_named_executable_that_exists_is_taken_as_is() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(locate(Some(f.path())).unwrap(), f.path());
    }
}
