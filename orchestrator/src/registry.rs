//! The PNode registry: who has joined, what they offer, and whether they are alive.

use crate::trust::{Outcome, Standing, Transition, TrustBook, TrustPolicy};
use actix::prelude::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a PNode offers, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// CPU cores.
    pub cores: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPU architecture.
    pub arch: String,
    /// Operating system.
    pub os: String,
    /// GPU description, empty without one.
    pub gpu: String,
    /// Nodes of the same class produce bit-identical results.
    pub determinism_class: String,
}

/// Liveness judged from heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Heartbeats arrive on time.
    Healthy,
    /// Some heartbeats missed.
    Suspect,
    /// Silent past the timeout, or found dead when probed.
    Lost,
    /// Leaving: its work is being moved away and it gets no new work.
    Draining,
}

impl Health {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Suspect => "suspect",
            Health::Lost => "lost",
            Health::Draining => "draining",
        }
    }
}

/// A PNode as the rest of the orchestrator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PNodeView {
    /// Assigned id.
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// Where its `PNode` service listens.
    pub endpoint: String,
    /// What it offers.
    pub caps: Caps,
    /// Liveness now.
    pub health: Health,
    /// VNodes it reported hosting.
    pub hosted_vnodes: u32,
    /// Hex of the ed25519 public key its id derives from.
    pub public_key: String,
    /// Presented the trusted-mode token.
    pub trusted: bool,
    /// Reputation standing now (see `trust`).
    pub standing: Standing,
    /// 1 − recent error rate.
    pub reputation: f64,
    /// Why it is quarantined, if it is.
    pub quarantine_reason: Option<String>,
}

/// Heartbeat timing.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    /// Period PNodes are asked to heartbeat at.
    pub interval: Duration,
    /// Silence after which a PNode is lost.
    pub timeout: Duration,
}

impl HealthPolicy {
    /// Health of a PNode last heard from `silence` ago.
    pub fn judge(&self, silence: Duration) -> Health {
        if silence >= self.timeout {
            Health::Lost
        } else if silence >= self.interval * 2 {
            Health::Suspect
        } else {
            Health::Healthy
        }
    }
}

struct Record {
    view: PNodeView,
    last_seen: Instant,
    /// Declared lost (a failed probe) before its heartbeats timed out.
    lost: bool,
    draining: bool,
}

impl Record {
    fn health(&self, policy: &HealthPolicy, now: Instant) -> Health {
        match policy.judge(now.duration_since(self.last_seen)) {
            _ if self.lost => Health::Lost,
            // Silence outranks leaving: a draining PNode that stopped answering is lost.
            Health::Healthy | Health::Suspect if self.draining => Health::Draining,
            h => h,
        }
    }
}

/// Actor owning the table of PNodes.
pub struct Registry {
    policy: HealthPolicy,
    pnodes: BTreeMap<String, Record>,
    /// Reputation of every identity ever seen, kept when a PNode leaves.
    trust: TrustBook,
    /// Where the trust book is saved (none: memory only).
    store: Option<std::sync::Arc<dyn crate::artifacts::ObjectStore>>,
    /// The book changed since it was last saved.
    unsaved: bool,
    /// A save is running.
    saving: bool,
}

impl Registry {
    /// An empty registry.
    pub fn new(policy: HealthPolicy) -> Registry {
        Registry {
            policy,
            pnodes: BTreeMap::new(),
            trust: TrustBook::new(TrustPolicy::default()),
            store: None,
            unsaved: false,
            saving: false,
        }
    }

    /// Saves the trust book in `store` (and starts from `saved`, what an earlier run saved).
    pub fn with_ledger(
        mut self,
        store: std::sync::Arc<dyn crate::artifacts::ObjectStore>,
        saved: BTreeMap<String, crate::trust::Reputation>,
    ) -> Registry {
        self.trust = self.trust.with_reputations(saved);
        self.store = Some(store);
        self
    }

    /// Writes the book if it changed and no write is running; a failed write is retried later.
    fn save_book(&mut self, ctx: &mut Context<Self>) {
        let Some(store) = self.store.clone() else { return };
        if !self.unsaved || self.saving {
            return;
        }
        self.unsaved = false;
        self.saving = true;
        let book = self.trust.reputations().clone();
        ctx.spawn(async move { crate::ledger::save(store.as_ref(), &book).await }.into_actor(self).map(|r, act, _| {
            act.saving = false;
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot save the trust book; will retry");
                act.unsaved = true;
            }
        }));
    }

    /// The same with other reputation rules.
    pub fn with_trust(mut self, policy: TrustPolicy) -> Registry {
        self.trust = TrustBook::new(policy);
        self
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Routine changes (valid results, registrations) are saved within a second; a
        // quarantine at once.
        ctx.run_interval(Duration::from_secs(1), |act, ctx| act.save_book(ctx));
    }
}

/// A registration request that already passed the protocol-version, signature and token checks.
#[derive(Message)]
#[rtype(result = "Result<String, String>")]
pub struct Register {
    /// Id derived from the public key (`dcnr_proto::identity::pnode_id`).
    pub id: String,
    /// Hex of the public key.
    pub public_key: String,
    /// Presented the trusted-mode token.
    pub trusted: bool,
    /// Operator-chosen name.
    pub name: String,
    /// Where its `PNode` service listens.
    pub endpoint: String,
    /// What it offers.
    pub caps: Caps,
}

impl Handler<Register> for Registry {
    type Result = Result<String, String>;

    /// Refuses a quarantined identity with the reason; an identity registering again (a restart)
    /// replaces its old record and keeps its reputation.
    fn handle(&mut self, msg: Register, _: &mut Context<Self>) -> Result<String, String> {
        let id = msg.id;
        let standing = self.trust.admit(&id, msg.trusted).map_err(|why| format!("pnode {id} is quarantined: {why}"))?;
        self.unsaved = true;
        tracing::info!(pnode = %id, name = %msg.name, endpoint = %msg.endpoint, cores = msg.caps.cores, standing = standing.name(), "pnode joined");
        let view = PNodeView {
            id: id.clone(),
            name: msg.name,
            endpoint: msg.endpoint,
            caps: msg.caps,
            health: Health::Healthy,
            hosted_vnodes: 0,
            public_key: msg.public_key,
            trusted: msg.trusted,
            standing,
            reputation: 1.0,
            quarantine_reason: None,
        };
        self.pnodes.insert(id.clone(), Record { view, last_seen: Instant::now(), lost: false, draining: false });
        Ok(id)
    }
}

/// A heartbeat; answers whether the PNode is known.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Heartbeat {
    /// PNode id.
    pub id: String,
    /// VNodes it hosts.
    pub hosted_vnodes: u32,
}

impl Handler<Heartbeat> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: Heartbeat, _: &mut Context<Self>) -> bool {
        let now = Instant::now();
        match self.pnodes.get_mut(&msg.id) {
            // Once lost, its VNodes were relocated: it must join again with a clean slate, so a
            // PNode that was only paused never mixes its old work into the job.
            Some(r) if r.health(&self.policy, now) == Health::Lost => {
                tracing::warn!(pnode = %msg.id, "a lost pnode is heartbeating again; asking it to register anew");
                self.pnodes.remove(&msg.id);
                false
            }
            Some(r) => {
                r.last_seen = now;
                r.view.hosted_vnodes = msg.hosted_vnodes;
                true
            }
            None => false,
        }
    }
}

/// All PNodes with their health now.
#[derive(Message)]
#[rtype(result = "Vec<PNodeView>")]
pub struct Snapshot;

impl Handler<Snapshot> for Registry {
    type Result = Vec<PNodeView>;

    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Vec<PNodeView> {
        let now = Instant::now();
        self.pnodes
            .values()
            .map(|r| {
                let mut v = r.view.clone();
                v.health = r.health(&self.policy, now);
                v.standing = self.trust.standing(&v.id);
                if let Some(rep) = self.trust.get(&v.id) {
                    v.reputation = rep.score();
                    v.quarantine_reason = rep.quarantined.clone();
                }
                v
            })
            .collect()
    }
}

/// Declares a PNode lost at once (it failed a probe after an RPC error), without waiting for
/// its heartbeats to time out.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MarkLost(pub String);

impl Handler<MarkLost> for Registry {
    type Result = ();

    fn handle(&mut self, msg: MarkLost, _: &mut Context<Self>) {
        if let Some(r) = self.pnodes.get_mut(&msg.0)
            && !r.lost
        {
            tracing::warn!(pnode = %msg.0, "pnode is unreachable; declared lost");
            r.lost = true;
        }
    }
}

/// Marks a PNode as leaving; answers its endpoint, or `None` if it is unknown.
#[derive(Message)]
#[rtype(result = "Option<String>")]
pub struct Drain(pub String);

impl Handler<Drain> for Registry {
    type Result = Option<String>;

    fn handle(&mut self, msg: Drain, _: &mut Context<Self>) -> Option<String> {
        let r = self.pnodes.get_mut(&msg.0)?;
        tracing::info!(pnode = %msg.0, "pnode is leaving; draining it");
        r.draining = true;
        Some(r.view.endpoint.clone())
    }
}

/// One PNode's view, if known.
#[derive(Message)]
#[rtype(result = "Option<PNodeView>")]
pub struct Lookup(pub String);

impl Handler<Lookup> for Registry {
    type Result = Option<PNodeView>;

    fn handle(&mut self, msg: Lookup, _: &mut Context<Self>) -> Option<PNodeView> {
        let now = Instant::now();
        self.pnodes.get(&msg.0).map(|r| {
            let mut v = r.view.clone();
            v.health = r.health(&self.policy, now);
            v
        })
    }
}

/// The verdict on one execution of a PNode's work; answers what it changed.
#[derive(Message)]
#[rtype(result = "Transition")]
pub struct RecordOutcome {
    /// PNode id.
    pub pnode: String,
    /// Valid or invalid (with the reason).
    pub outcome: Outcome,
}

impl Handler<RecordOutcome> for Registry {
    type Result = MessageResult<RecordOutcome>;

    fn handle(&mut self, msg: RecordOutcome, ctx: &mut Context<Self>) -> Self::Result {
        let t = self.trust.record(&msg.pnode, &msg.outcome);
        self.unsaved = true;
        if matches!(t, Transition::Quarantined(_)) {
            self.save_book(ctx);
        }
        match &t {
            Transition::Quarantined(why) => tracing::warn!(pnode = %msg.pnode, reason = %why, "pnode quarantined"),
            Transition::Earned => tracing::info!(pnode = %msg.pnode, "pnode became reliable"),
            Transition::Lost => tracing::info!(pnode = %msg.pnode, "pnode lost its reliable standing"),
            Transition::None => {}
        }
        MessageResult(t)
    }
}
