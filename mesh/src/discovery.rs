//! Finding orchestrators: `--orchestrator` takes URLs and `dns:NAME` entries, comma-separated.
//! A `dns:` entry is looked up with hickory-resolver: the SRV records of `_dcnr._tcp.NAME` name
//! the orchestrators (lowest priority first, then heaviest weight), and a TXT record of the same
//! name may carry the CA's fingerprint (`dcnr-ca-sha256=<64 hex>`), so a volunteer needs one name
//! and nothing else. The choice among candidates (reachability) is the caller's.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use std::net::SocketAddr;

/// The DNS prefix under which orchestrators publish SRV and TXT records.
pub const SRV_PREFIX: &str = "_dcnr._tcp.";
/// The TXT key carrying the mesh CA's SHA-256.
pub const TXT_CA_KEY: &str = "dcnr-ca-sha256=";
/// Most entries one `--orchestrator` value may list, and most candidates one name may give.
pub const MAX_CANDIDATES: usize = 64;

/// Why a list of orchestrators could not be read or resolved.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The list has an empty or malformed entry.
    #[error("--orchestrator entry `{entry}`: {why}")]
    Entry {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The list is empty or too long.
    #[error("--orchestrator lists {0} entries (1..=64 allowed)")]
    Count(usize),
    /// The resolver could not be set up.
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
    /// A name has no SRV records, or the look-up failed.
    #[error("no orchestrator found under `{name}`: {why}")]
    Lookup {
        /// The SRV name looked up.
        name: String,
        /// The resolver's answer.
        why: String,
    },
    /// A TXT record names a fingerprint that is not 64 hex digits.
    #[error("TXT record of `{name}` carries `{value}`, not a SHA-256 in hex")]
    BadPin {
        /// The TXT name.
        name: String,
        /// The value found.
        value: String,
    },
}

/// One entry of an `--orchestrator` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A URL used as given.
    Url(String),
    /// A DNS name whose SRV records list orchestrators.
    Dns(String),
}

/// An orchestrator to try: its URL and, when DNS published one, the CA fingerprint to pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `scheme://host:port`.
    pub url: String,
    /// The CA's SHA-256 (hex) from the name's TXT record.
    pub ca_sha256: Option<String>,
}

/// Parses `url[,url|dns:NAME]...`; whitespace around entries is ignored.
pub fn parse_sources(spec: &str) -> Result<Vec<Source>, DiscoveryError> {
    let entries: Vec<&str> = spec.split(',').map(str::trim).collect();
    if entries.is_empty() || entries.len() > MAX_CANDIDATES {
        return Err(DiscoveryError::Count(entries.len()));
    }
    entries
        .into_iter()
        .map(|e| {
            let bad = |why| DiscoveryError::Entry { entry: e.to_string(), why };
            if let Some(name) = e.strip_prefix("dns:") {
                let name = name.trim_end_matches('.');
                let ok = !name.is_empty()
                    && name.len() <= 240
                    && name.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    });
                return if ok { Ok(Source::Dns(name.to_string())) } else { Err(bad("not a DNS name")) };
            }
            match e.split_once("://") {
                Some(("http" | "https", rest)) if !rest.is_empty() => Ok(Source::Url(e.to_string())),
                Some(_) => Err(bad("the scheme must be https:// (or http:// with --insecure-plaintext)")),
                None if e.is_empty() => Err(bad("empty entry")),
                None => Err(bad("not a URL or dns:NAME")),
            }
        })
        .collect()
}

/// One SRV answer, as the ordering needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    /// Lower is tried first.
    pub priority: u16,
    /// Among equal priorities, heavier first.
    pub weight: u16,
    /// Host name (a trailing dot is dropped).
    pub target: String,
    /// TCP port.
    pub port: u16,
}

/// Candidates in the order to try them: priority ascending, weight descending, then by target
/// and port so every PNode reading the same records tries them in the same order (RFC 2782's
/// random weighting would spread first contacts; orchestrators here share their work through
/// the store, so a stable order is simpler to reason about).
pub fn order_srv(mut targets: Vec<SrvTarget>, scheme: &str, pin: Option<&str>) -> Vec<Candidate> {
    targets.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.weight.cmp(&a.weight))
            .then(a.target.cmp(&b.target))
            .then(a.port.cmp(&b.port))
    });
    targets.dedup();
    targets
        .into_iter()
        .filter(|t| t.target != "." && !t.target.is_empty())
        .take(MAX_CANDIDATES)
        .map(|t| Candidate {
            url: format!("{scheme}://{}:{}", t.target.trim_end_matches('.'), t.port),
            ca_sha256: pin.map(str::to_string),
        })
        .collect()
}

/// The CA fingerprint among a name's TXT strings: the first `dcnr-ca-sha256=` entry, which must
/// be 64 hex digits (lower-cased here). Other TXT strings are ignored.
pub fn txt_pin(name: &str, strings: &[String]) -> Result<Option<String>, DiscoveryError> {
    let Some(value) = strings.iter().find_map(|s| s.trim().strip_prefix(TXT_CA_KEY)) else { return Ok(None) };
    let value = value.trim();
    if value.len() == 64 && value.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(Some(value.to_ascii_lowercase()))
    } else {
        Err(DiscoveryError::BadPin { name: name.to_string(), value: value.chars().take(80).collect() })
    }
}

/// How long a candidate gets to answer [`answers`].
pub const PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a candidate did not answer [`answers`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing answered, or the handshake failed.
    #[error("{0}")]
    Unreachable(String),
    /// It answered with another CA than the pin.
    #[error("{0}")]
    OtherCa(String),
}

/// Whether the orchestrator at `url` answers within [`PROBE`]: in plaintext mode it accepts a
/// TCP connection; with TLS it completes a handshake and, given a `pin`, presents that CA.
pub async fn answers(url: &str, plaintext: bool, pin: Option<&str>) -> Result<(), ProbeError> {
    let silent = || ProbeError::Unreachable("no answer".into());
    if plaintext {
        let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = authority.split('/').next().unwrap_or(authority);
        return match tokio::time::timeout(PROBE, tokio::net::TcpStream::connect(authority)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProbeError::Unreachable(e.to_string())),
            Err(_) => Err(silent()),
        };
    }
    let ca = match tokio::time::timeout(PROBE, dcnr_proto::tls::fetch_server_ca(url)).await {
        Ok(Ok(ca)) => ca,
        Ok(Err(e)) => return Err(ProbeError::Unreachable(e.to_string())),
        Err(_) => return Err(silent()),
    };
    match pin {
        Some(pin) => dcnr_proto::tls::check_pin(&ca, pin).map_err(|e| ProbeError::OtherCa(e.to_string())),
        None => Ok(()),
    }
}

/// No cache (every look-up asks again, so a changed record is seen at once; look-ups are rare),
/// and a short timeout so a dead DNS server does not hold up the next attempt.
fn options() -> ResolverOpts {
    let mut o = ResolverOpts::default();
    o.cache_size = 0;
    o.timeout = std::time::Duration::from_secs(2);
    o.attempts = 2;
    o
}

/// Resolves `--orchestrator` lists into candidates.
pub struct Discovery {
    resolver: TokioResolver,
}

impl Discovery {
    /// A resolver using this machine's DNS configuration, or only `server` (UDP and TCP) when
    /// given (a private DNS server, or a test's).
    pub fn new(server: Option<SocketAddr>) -> Result<Discovery, DiscoveryError> {
        let resolver = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let config =
                    ResolverConfig::from_name_servers(vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])]);
                let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
                *builder.options_mut() = options();
                builder.build().map_err(|e| DiscoveryError::Resolver(e.to_string()))?
            }
            None => TokioResolver::builder_tokio()
                .and_then(|mut b| {
                    *b.options_mut() = options();
                    b.build()
                })
                .map_err(|e| DiscoveryError::Resolver(e.to_string()))?,
        };
        Ok(Discovery { resolver })
    }

    /// Every candidate of `sources`, in order: URLs as given, each name's SRV targets in
    /// [`order_srv`] order with its TXT pin. Duplicates keep their first place.
    pub async fn candidates(&self, sources: &[Source], scheme: &str) -> Result<Vec<Candidate>, DiscoveryError> {
        let mut out: Vec<Candidate> = Vec::new();
        for source in sources {
            let found = match source {
                Source::Url(url) => vec![Candidate { url: url.clone(), ca_sha256: None }],
                Source::Dns(name) => self.lookup(name, scheme).await?,
            };
            for c in found {
                if !out.iter().any(|o| o.url == c.url) {
                    out.push(c);
                }
            }
        }
        out.truncate(MAX_CANDIDATES);
        Ok(out)
    }

    async fn lookup(&self, name: &str, scheme: &str) -> Result<Vec<Candidate>, DiscoveryError> {
        let srv_name = format!("{SRV_PREFIX}{name}.");
        let lookup_err =
            |e: &dyn std::fmt::Display| DiscoveryError::Lookup { name: srv_name.clone(), why: e.to_string() };
        let srv = self.resolver.srv_lookup(srv_name.as_str()).await.map_err(|e| lookup_err(&e))?;
        let targets: Vec<SrvTarget> = srv
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                hickory_resolver::proto::rr::RData::SRV(s) => Some(SrvTarget {
                    priority: s.priority,
                    weight: s.weight,
                    target: s.target.to_ascii(),
                    port: s.port,
                }),
                _ => None,
            })
            .collect();
        // A missing TXT record is normal; a malformed pin is not.
        let strings: Vec<String> = match self.resolver.txt_lookup(srv_name.as_str()).await {
            Ok(txt) => txt
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::TXT(t) => Some(
                        t.txt_data.iter().map(|part| String::from_utf8_lossy(part).into_owned()).collect::<String>(),
                    ),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let pin = txt_pin(&srv_name, &strings)?;
        let found = order_srv(targets, scheme, pin.as_deref());
        if found.is_empty() {
            return Err(lookup_err(&"no SRV targets"));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_bad_entries_are_named() {
        assert_eq!(
            parse_sources("https://a:1, dns:mesh.example.org.,http://b:2").unwrap(),
            vec![
                Source::Url("https://a:1".into()),
                Source::Dns("mesh.example.org".into()),
                Source::Url("http://b:2".into())
            ]
        );
        for (bad, why) in [
            ("", "empty entry"),
            ("https://a:1,", "empty entry"),
            ("ftp://a", "the scheme must be"),
            ("dns:", "not a DNS name"),
            ("dns:a..b", "not a DNS name"),
            ("dns:a b", "not a DNS name"),
            ("a:1", "not a URL"),
        ] {
            let e = parse_sources(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(matches!(parse_sources(&vec!["dns:a"; 65].join(",")), Err(DiscoveryError::Count(65))));
    }

    #[test]
    fn srv_targets_are_ordered_by_priority_then_weight_and_the_pin_rides_along() {
        let t = |priority, weight, target: &str, port| SrvTarget { priority, weight, target: target.into(), port };
        let got = order_srv(
            vec![t(20, 0, "c.", 3), t(10, 1, "b.", 2), t(10, 5, "a.", 1), t(10, 5, "a.", 1), t(0, 0, ".", 9)],
            "https",
            Some("ab"),
        );
        let urls: Vec<&str> = got.iter().map(|c| c.url.as_str()).collect();
        assert_eq!(urls, ["https://a:1", "https://b:2", "https://c:3"]);
        assert!(got.iter().all(|c| c.ca_sha256.as_deref() == Some("ab")));
    }

    #[test]
    fn txt_pins_must_be_sha256_hex() {
        let hex = "AB".repeat(32);
        let strings = vec!["v=other".to_string(), format!("{TXT_CA_KEY}{hex}")];
        assert_eq!(txt_pin("n", &strings).unwrap(), Some("ab".repeat(32)));
        assert_eq!(txt_pin("n", &["v=other".to_string()]).unwrap(), None);
        assert!(txt_pin("n", &[format!("{TXT_CA_KEY}xyz")]).is_err());
    }
}
