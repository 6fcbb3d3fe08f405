//! The PNode registry: who has joined, what they offer, and whether they are alive.
//!
//! The decisions live in [`PNodeTable`], plain data fed with the time as a value, so tests, the
//! scale benchmark and a simulator drive it directly. The [`Registry`] actor holds a table and
//! a [`Clock`], answers messages from it, and saves the trust book: its only IO.

use crate::clock::Clock;
use crate::placement::{self, Eligibility, Offer};
use crate::trust::{Outcome, Standing, Transition, TrustBook, TrustPolicy};
use actix::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

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
    /// The GPU's matrix-product throughput measured by the PNode at start, GFLOP/s (0: none).
    #[serde(default)]
    pub gpu_gflops: u32,
    /// The GPU's determinism class (backend, adapter, driver), empty without one.
    #[serde(default)]
    pub gpu_determinism_class: String,
}

impl Caps {
    /// Whether a job with `target` computes on this PNode's GPU: it has one and the target
    /// allows it.
    pub fn computes_on_gpu(&self, target: dcnr_model::envelope::Target) -> bool {
        target != dcnr_model::envelope::Target::Cpu && !self.gpu.is_empty()
    }

    /// The determinism class of the work a job with `target` does here: the GPU's when it
    /// computes on the GPU, the CPU's otherwise.
    pub fn class_for(&self, target: dcnr_model::envelope::Target) -> &str {
        if self.computes_on_gpu(target) { &self.gpu_determinism_class } else { &self.determinism_class }
    }
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

/// How a PNode is reached, and what it offers others for reaching PNodes behind NAT.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reach {
    /// `host:port` of the relay it is reached through (it cannot accept connections); `None`
    /// when reached directly.
    pub relayed_via: Option<String>,
    /// `host:port` of the relay it offers to PNodes behind NAT, if any.
    pub relay_offer: Option<String>,
    /// For a relayed PNode: its heartbeats say it listens at the relay (until then it gets no work).
    pub relay_listening: bool,
    /// It cannot be reached directly and no relay was offered when it registered: it gets no
    /// work (until it registers again when one is).
    pub unreachable: bool,
}

impl Reach {
    /// Whether others can reach it now: directly, or through a relay it listens at.
    pub fn reachable(&self) -> bool {
        match self.relayed_via {
            Some(_) => self.relay_listening,
            None => !self.unreachable,
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
    /// Direct or relayed, and the relay it offers.
    pub reach: Reach,
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

/// A registration that already passed the protocol-version, signature and token checks.
#[derive(Debug, Clone)]
pub struct Registration {
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
    /// Direct or relayed (`relay_listening` is false until a heartbeat says so).
    pub reach: Reach,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The identity misbehaved repeatedly (see `trust`).
    #[error("pnode {id} is quarantined: {reason}")]
    Quarantined {
        /// PNode id.
        id: String,
        /// Why it was quarantined.
        reason: String,
    },
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// A known PNode: its silence ends.
    Alive,
    /// No such PNode (never registered, or forgotten).
    Unknown,
    /// It had been lost and its work moved: it is forgotten now and must register anew.
    Forgotten,
}

/// The PNodes a placement may use, borrowed from the table.
#[derive(Debug)]
pub struct Candidates<'a> {
    /// PNodes [`placement::suitable`] for the request, excluded ones included (what a job's
    /// share of the mesh is counted over).
    pub suitable: usize,
    /// Offers of the [`placement::eligible`] PNodes with memory left, in id order; each offers
    /// its memory not yet reserved.
    pub offers: Vec<&'a Offer>,
}

struct Record {
    /// Its `health` is only as current as the last [`PNodeTable::candidates`] (readers judge it
    /// anew); its trust fields are kept current as outcomes arrive.
    view: PNodeView,
    /// Placement's view of it: `memory` is what is not reserved (0 stays "unknown").
    offer: Offer,
    /// Memory reserved by placements (see [`PNodeTable::reserve`]).
    reserved: u64,
    last_seen: Duration,
    /// Declared lost (a failed probe) before its heartbeats timed out.
    lost: bool,
    draining: bool,
    /// Keyed hash of its endpoint's host, lowercase: the scan for candidates compares numbers
    /// and reads the endpoint only when one matches a host the request avoids.
    host: Option<u64>,
}

impl Record {
    #[inline]
    fn health(&self, policy: &HealthPolicy, now: Duration) -> Health {
        // A time before the last heartbeat (callers racing) is no silence at all.
        match policy.judge(now.saturating_sub(self.last_seen)) {
            _ if self.lost => Health::Lost,
            // Silence outranks leaving: a draining PNode that stopped answering is lost.
            Health::Healthy | Health::Suspect if self.draining => Health::Draining,
            h => h,
        }
    }

    /// The view with health as of `now`.
    fn view_at(&self, policy: &HealthPolicy, now: Duration) -> PNodeView {
        let mut v = self.view.clone();
        v.health = self.health(policy, now);
        v
    }

    /// Memory a placement may still use: 0 when everything known is reserved.
    fn memory_left(&self) -> u64 {
        self.view.caps.memory_bytes.saturating_sub(self.reserved)
    }

    /// No memory left to offer (an unknown amount never runs out).
    fn full(&self) -> bool {
        self.view.caps.memory_bytes != 0 && self.memory_left() == 0
    }
}

/// A healthy-or-not PNode view `p<i>` at `http://h<i>:1` with the simulator's capabilities, for
/// tests of the modules that place work.
#[cfg(test)]
pub(crate) fn test_view(i: usize, health: Health) -> PNodeView {
    PNodeView {
        id: format!("p{i}"),
        name: format!("p{i}"),
        endpoint: format!("http://h{i}:1"),
        caps: crate::sim::sim_caps(),
        health,
        hosted_vnodes: 0,
        public_key: String::new(),
        trusted: false,
        standing: crate::trust::Standing::New,
        reputation: 1.0,
        quarantine_reason: None,
        reach: Reach::default(),
    }
}

/// Copies `id`'s standing, score and quarantine reason from the book into its view.
fn sync_trust(view: &mut PNodeView, trust: &TrustBook) {
    view.standing = trust.standing(&view.id);
    if let Some(rep) = trust.get(&view.id) {
        view.reputation = rep.score();
        view.quarantine_reason = rep.quarantined.clone();
    }
}

/// The relay a PNode behind NAT (`pnode`) is to listen at: `own` (this orchestrator's), else the
/// relay offered by a healthy, directly reached PNode with the fewest relayed PNodes on it
/// already (then by id); `None` when nobody offers one.
pub fn choose_relay(own: Option<&str>, pnodes: &[PNodeView], pnode: &str) -> Option<String> {
    if let Some(own) = own {
        return Some(own.to_string());
    }
    let load = |relay: &str| pnodes.iter().filter(|p| p.reach.relayed_via.as_deref() == Some(relay)).count();
    pnodes
        .iter()
        .filter(|p| p.id != pnode && p.health == Health::Healthy && p.reach.relayed_via.is_none())
        .filter_map(|p| p.reach.relay_offer.as_deref().map(|r| (load(r), &p.id, r)))
        .min()
        .map(|(_, _, r)| r.to_string())
}

/// The registry's decisions as plain data: PNodes, their health judged from heartbeat times,
/// and the trust book. No IO and no clock: every method that needs the time takes `now`, a
/// [`Duration`] since any fixed origin (see [`crate::clock::Clock`]), so a simulator or a test
/// drives it with simulated time.
pub struct PNodeTable {
    policy: HealthPolicy,
    records: BTreeMap<String, Record>,
    /// Reputation of every identity ever seen, kept when a PNode leaves.
    trust: TrustBook,
    /// Keys of the host hashes (random, so peers cannot choose endpoints that collide).
    hosts: RandomState,
}

impl PNodeTable {
    /// An empty table judging health by `policy`, with `trust` as the book of reputations.
    pub fn new(policy: HealthPolicy, trust: TrustBook) -> PNodeTable {
        PNodeTable { policy, records: BTreeMap::new(), trust, hosts: RandomState::new() }
    }

    /// The heartbeat timing in force.
    pub fn policy(&self) -> HealthPolicy {
        self.policy
    }

    /// The book of reputations (what the registry saves).
    pub fn trust(&self) -> &TrustBook {
        &self.trust
    }

    /// Joins other orchestrators' records into the book, and the PNodes' views follow; returns
    /// how many identities changed.
    pub fn absorb_trust(&mut self, other: &BTreeMap<String, crate::trust::Reputation>) -> usize {
        let changed = self.trust.absorb(other);
        for id in &changed {
            if let Some(r) = self.records.get_mut(id) {
                sync_trust(&mut r.view, &self.trust);
            }
        }
        changed.len()
    }

    /// PNodes registered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No PNode registered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Admits a PNode at `now`: refuses a quarantined identity; one registering again (a
    /// restart) replaces its old record, reservations included, and keeps its reputation.
    pub fn register(&mut self, reg: Registration, now: Duration) -> Result<Standing, Refused> {
        let standing = self
            .trust
            .admit(&reg.id, reg.trusted)
            .map_err(|reason| Refused::Quarantined { id: reg.id.clone(), reason })?;
        let offer = Offer {
            pnode: reg.id.clone(),
            cores: reg.caps.cores,
            memory: reg.caps.memory_bytes,
            relayed: reg.reach.relayed_via.is_some(),
            // The table ranks by cores; a job that computes on GPUs weighs them (`Offer::of`).
            gpu_gflops: 0,
        };
        let mut view = PNodeView {
            id: reg.id,
            name: reg.name,
            endpoint: reg.endpoint,
            caps: reg.caps,
            health: Health::Healthy,
            hosted_vnodes: 0,
            public_key: reg.public_key,
            trusted: reg.trusted,
            standing,
            reputation: 1.0,
            quarantine_reason: None,
            reach: reg.reach,
        };
        sync_trust(&mut view, &self.trust);
        let host = self.host_key(&view.endpoint);
        let record = Record { view, offer, reserved: 0, last_seen: now, lost: false, draining: false, host };
        self.records.insert(record.view.id.clone(), record);
        Ok(standing)
    }

    /// Drops PNodes silent for longer than `after` (long lost: they would have to register
    /// anew anyway) and forgets their identities where the book holds nothing worth keeping;
    /// returns how many records and book entries went. Keeps the table and the book bounded
    /// against identities made to be thrown away.
    pub fn evict_dead(&mut self, now: Duration, after: Duration) -> (usize, usize) {
        let dead: Vec<String> = self
            .records
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.last_seen) > after)
            .map(|(id, _)| id.clone())
            .collect();
        let mut forgotten = 0;
        for id in &dead {
            self.records.remove(id);
            if self.trust.forget_if_blank(id) {
                forgotten += 1;
            }
        }
        (dead.len(), forgotten)
    }

    /// A heartbeat from `id` at `now`, reporting the VNodes it hosts and, for a relayed PNode,
    /// whether it listens at its relay.
    pub fn heartbeat(&mut self, id: &str, hosted_vnodes: u32, relay_listening: bool, now: Duration) -> Beat {
        let Some(r) = self.records.get_mut(id) else { return Beat::Unknown };
        if r.health(&self.policy, now) == Health::Lost {
            // Once lost, its VNodes were relocated: it must join again with a clean slate, so a
            // PNode that was only paused never mixes its old work into the job.
            self.records.remove(id);
            return Beat::Forgotten;
        }
        r.last_seen = now;
        r.view.hosted_vnodes = hosted_vnodes;
        if r.view.reach.relayed_via.is_some() && r.view.reach.relay_listening != relay_listening {
            tracing::info!(pnode = %id, relay = ?r.view.reach.relayed_via, relay_listening, "relayed pnode's relay connection changed");
            r.view.reach.relay_listening = relay_listening;
        }
        Beat::Alive
    }

    /// Declares `id` lost at once (it failed a probe); true if it was not already declared so.
    pub fn mark_lost(&mut self, id: &str) -> bool {
        match self.records.get_mut(id) {
            Some(r) if !r.lost => {
                r.lost = true;
                true
            }
            _ => false,
        }
    }

    /// Whether `id` announced that it is leaving.
    pub fn is_draining(&self, id: &str) -> bool {
        self.records.get(id).is_some_and(|r| r.draining)
    }

    /// Marks `id` as leaving; answers its endpoint, or `None` if it is unknown.
    pub fn drain(&mut self, id: &str) -> Option<String> {
        let r = self.records.get_mut(id)?;
        r.draining = true;
        Some(r.view.endpoint.clone())
    }

    /// Health of `id` at `now`, if it is known.
    pub fn health(&self, id: &str, now: Duration) -> Option<Health> {
        self.records.get(id).map(|r| r.health(&self.policy, now))
    }

    /// One PNode's view at `now`, if it is known.
    pub fn lookup(&self, id: &str, now: Duration) -> Option<PNodeView> {
        self.records.get(id).map(|r| r.view_at(&self.policy, now))
    }

    /// Every PNode's view at `now`, in id order.
    pub fn list(&self, now: Duration) -> Vec<PNodeView> {
        self.records.values().map(|r| r.view_at(&self.policy, now)).collect()
    }

    /// Applies the verdict on one execution of `pnode`'s work; answers what it changed.
    pub fn record_outcome(&mut self, pnode: &str, outcome: &Outcome) -> Transition {
        let t = self.trust.record(pnode, outcome);
        if let Some(r) = self.records.get_mut(pnode) {
            sync_trust(&mut r.view, &self.trust);
        }
        t
    }

    /// Bytes the table holds, estimated from sizes: every record and trust-book entry with the
    /// heap bytes of its strings. Map nodes and allocator overhead are not counted.
    pub fn footprint(&self) -> u64 {
        use std::mem::size_of;
        let records: usize = self
            .records
            .iter()
            .map(|(key, r)| {
                let v = &r.view;
                let strings = [&v.id, &v.name, &v.endpoint, &v.caps.arch, &v.caps.os, &v.caps.gpu]
                    .into_iter()
                    .chain([&v.caps.determinism_class, &v.public_key, &r.offer.pnode, key])
                    .chain(&v.quarantine_reason)
                    .map(String::capacity)
                    .sum::<usize>();
                size_of::<String>() + size_of::<Record>() + strings
            })
            .sum();
        let trust: usize = self
            .trust
            .reputations()
            .iter()
            .map(|(key, rep)| {
                let strings = [&rep.quarantined, &rep.last_invalid].into_iter().flatten().map(String::capacity);
                size_of::<String>() + size_of::<crate::trust::Reputation>() + key.capacity() + strings.sum::<usize>()
            })
            .sum();
        (records + trust) as u64
    }

    /// The machines (`verify::host_of`) of those of `ids` that are known and tell theirs: what
    /// a replica of their work keeps off ([`Eligibility::avoid_hosts`]).
    pub fn hosts_of(&self, ids: &BTreeSet<String>) -> BTreeSet<String> {
        ids.iter()
            .filter_map(|id| self.records.get(id))
            .filter_map(|r| crate::verify::host_of(&r.view.endpoint))
            .collect()
    }

    fn host_key(&self, endpoint: &str) -> Option<u64> {
        crate::verify::endpoint_host(endpoint).map(|h| self.hosts.hash_one(h.to_ascii_lowercase()))
    }

    /// The PNodes a placement under `req` may use at `now`, and how many are suitable at all:
    /// those [`placement::eligible`] admits, with memory left. Pass `offers` to
    /// [`placement::place`]; nothing is copied but the list of references.
    pub fn candidates(&mut self, now: Duration, req: &Eligibility) -> Candidates<'_> {
        let policy = self.policy;
        let mut suitable = 0;
        let mut offers = Vec::with_capacity(self.records.len());
        // `placement::kept_off` without reading every id and endpoint (a cache miss each):
        // excluded records by identity, avoided hosts by hash, confirmed on a match.
        let excluded: Vec<*const Record> =
            req.exclude.iter().filter_map(|id| self.records.get(id)).map(|r| r as *const Record).collect();
        let avoided: Vec<u64> = req.avoid_hosts.iter().map(|h| self.hosts.hash_one(h.to_ascii_lowercase())).collect();
        // One pass: every record's health is brought to `now` on the way.
        for r in self.records.values_mut() {
            let health = r.health(&policy, now);
            // Written only when it changed: a scan of the whole mesh per placement should not
            // dirty every record.
            if r.view.health != health {
                r.view.health = health;
            }
            let r: &Record = r;
            if !placement::suitable(&r.view, req) {
                continue;
            }
            suitable += 1;
            let kept_off = excluded.iter().any(|&e| std::ptr::eq(e, r))
                || (r.host.is_some_and(|h| avoided.contains(&h)) && placement::kept_off(&r.view, req));
            if !r.full() && !kept_off {
                offers.push(&r.offer);
            }
        }
        Candidates { suitable, offers }
    }

    /// Reserves `bytes` of `pnode`'s memory for a placement, so later placements are offered
    /// only the rest; false (and nothing reserved) if it is unknown or has too little left.
    /// PNodes whose memory is unknown accept any reservation.
    pub fn reserve(&mut self, pnode: &str, bytes: u64) -> bool {
        let Some(r) = self.records.get_mut(pnode) else { return false };
        let unknown = r.view.caps.memory_bytes == 0;
        if !unknown && bytes > r.memory_left() {
            return false;
        }
        r.reserved = r.reserved.saturating_add(bytes);
        r.offer.memory = if unknown { 0 } else { r.memory_left() };
        true
    }

    /// Returns `bytes` reserved on `pnode` (what a job releasing its VNodes gave back).
    pub fn release(&mut self, pnode: &str, bytes: u64) {
        if let Some(r) = self.records.get_mut(pnode) {
            r.reserved = r.reserved.saturating_sub(bytes);
            if r.view.caps.memory_bytes != 0 {
                r.offer.memory = r.memory_left();
            }
        }
    }
}

/// Actor around a [`PNodeTable`]: answers messages with the time of its [`Clock`] and saves
/// the trust book (its only IO).
pub struct Registry {
    table: PNodeTable,
    clock: Clock,
    /// Where the trust book is saved (none: memory only).
    store: Option<std::sync::Arc<dyn crate::artifacts::ObjectStore>>,
    /// This orchestrator's name: its book is saved under it.
    instance: String,
    /// A read of the other orchestrators' books is running.
    absorbing: bool,
    /// The book changed since it was last saved.
    unsaved: bool,
    /// A save is running.
    saving: bool,
}

impl Registry {
    /// An empty registry.
    pub fn new(policy: HealthPolicy) -> Registry {
        Registry {
            table: PNodeTable::new(policy, TrustBook::new(TrustPolicy::default())),
            clock: Clock::start(),
            store: None,
            instance: String::new(),
            absorbing: false,
            unsaved: false,
            saving: false,
        }
    }

    /// Saves the trust book in `store` as `instance`'s (and starts from `saved`, every book
    /// saved there before, joined).
    pub fn with_ledger(
        mut self,
        store: std::sync::Arc<dyn crate::artifacts::ObjectStore>,
        instance: String,
        saved: BTreeMap<String, crate::trust::Reputation>,
    ) -> Registry {
        let book = self.table.trust().clone().with_reputations(saved);
        self.table = PNodeTable::new(self.table.policy(), book);
        self.store = Some(store);
        self.instance = instance;
        self
    }

    /// Reads every orchestrator's saved book and joins it into this one, so a quarantine
    /// decided by another orchestrator sharing the store holds here too.
    fn absorb_books(&mut self, ctx: &mut Context<Self>) {
        let Some(store) = self.store.clone() else { return };
        if self.absorbing {
            return;
        }
        self.absorbing = true;
        ctx.spawn(async move { crate::ledger::load(store.as_ref()).await }.into_actor(self).map(|r, act, _| {
            act.absorbing = false;
            match r {
                Ok(books) => {
                    let changed = act.table.absorb_trust(&books);
                    if changed > 0 {
                        tracing::info!(identities = changed, "took in other orchestrators' trust records");
                        act.unsaved = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the other orchestrators' trust books"),
            }
        }));
    }

    /// Writes the book if it changed and no write is running; a failed write is retried later.
    fn save_book(&mut self, ctx: &mut Context<Self>) {
        let Some(store) = self.store.clone() else { return };
        if !self.unsaved || self.saving {
            return;
        }
        self.unsaved = false;
        self.saving = true;
        let book = self.table.trust().reputations().clone();
        let instance = self.instance.clone();
        ctx.spawn(async move { crate::ledger::save(store.as_ref(), &instance, &book).await }.into_actor(self).map(
            |r, act, _| {
                act.saving = false;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot save the trust book; will retry");
                    act.unsaved = true;
                }
            },
        ));
    }

    /// The same with other reputation rules (before any PNode registers: the book starts empty).
    pub fn with_trust(mut self, policy: TrustPolicy) -> Registry {
        self.table = PNodeTable::new(self.table.policy(), TrustBook::new(policy));
        self
    }
}

/// Silence after which a PNode's record is dropped (and its identity forgotten if blank).
pub const EVICT_AFTER: Duration = Duration::from_secs(3600);

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Routine changes (valid results, registrations) are saved within a second; a
        // quarantine at once.
        ctx.run_interval(Duration::from_secs(1), |act, ctx| act.save_book(ctx));
        ctx.run_interval(Duration::from_secs(1), |act, ctx| act.absorb_books(ctx));
        ctx.run_interval(Duration::from_secs(60), |act, _| {
            let (records, identities) = act.table.evict_dead(act.clock.now(), EVICT_AFTER);
            if records > 0 {
                tracing::info!(records, identities, "forgot PNodes silent for an hour");
                act.unsaved |= identities > 0;
            }
        });
    }
}

/// Registers a PNode; answers its id.
#[derive(Message)]
#[rtype(result = "Result<String, Refused>")]
pub struct Register(pub Registration);

impl Handler<Register> for Registry {
    type Result = Result<String, Refused>;

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) -> Result<String, Refused> {
        let reg = msg.0;
        let (id, name, endpoint, cores) = (reg.id.clone(), reg.name.clone(), reg.endpoint.clone(), reg.caps.cores);
        let standing = self.table.register(reg, self.clock.now())?;
        self.unsaved = true;
        tracing::info!(pnode = %id, name = %name, endpoint = %endpoint, cores, standing = standing.name(), "pnode joined");
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
    /// A relayed PNode listens at its relay.
    pub relay_listening: bool,
}

impl Handler<Heartbeat> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: Heartbeat, _: &mut Context<Self>) -> bool {
        match self.table.heartbeat(&msg.id, msg.hosted_vnodes, msg.relay_listening, self.clock.now()) {
            Beat::Alive => true,
            Beat::Unknown => false,
            Beat::Forgotten => {
                tracing::warn!(pnode = %msg.id, "a lost pnode is heartbeating again; asking it to register anew");
                false
            }
        }
    }
}

/// Lists every PNode with its health now.
#[derive(Message)]
#[rtype(result = "Vec<PNodeView>")]
pub struct ListPNodes;

impl Handler<ListPNodes> for Registry {
    type Result = Vec<PNodeView>;

    fn handle(&mut self, _: ListPNodes, _: &mut Context<Self>) -> Vec<PNodeView> {
        self.table.list(self.clock.now())
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
        let leaving = self.table.is_draining(&msg.0);
        if self.table.mark_lost(&msg.0) {
            // A PNode that announced its departure and then went away has left, as it said.
            if leaving {
                tracing::info!(pnode = %msg.0, "pnode left");
            } else {
                tracing::warn!(pnode = %msg.0, "pnode is unreachable; declared lost");
            }
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
        let endpoint = self.table.drain(&msg.0)?;
        tracing::info!(pnode = %msg.0, "pnode is leaving; draining it");
        Some(endpoint)
    }
}

/// One PNode's view, if known.
#[derive(Message)]
#[rtype(result = "Option<PNodeView>")]
pub struct Lookup(pub String);

impl Handler<Lookup> for Registry {
    type Result = Option<PNodeView>;

    fn handle(&mut self, msg: Lookup, _: &mut Context<Self>) -> Option<PNodeView> {
        self.table.lookup(&msg.0, self.clock.now())
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
        let t = self.table.record_outcome(&msg.pnode, &msg.outcome);
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

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_model::envelope::Target;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> HealthPolicy {
        HealthPolicy { interval: 100 * MS, timeout: 500 * MS }
    }

    fn table() -> PNodeTable {
        PNodeTable::new(policy(), TrustBook::new(TrustPolicy { quarantine_after: 2, ..TrustPolicy::default() }))
    }

    fn reg(id: &str, memory_gib: u64) -> Registration {
        Registration {
            id: id.into(),
            public_key: "00".into(),
            trusted: false,
            name: id.into(),
            endpoint: format!("http://10.0.0.{}:7071", id.len()),
            caps: Caps {
                cores: 4,
                memory_bytes: memory_gib << 30,
                arch: "x86_64".into(),
                os: "linux".into(),
                gpu: String::new(),
                determinism_class: "c1".into(),
                gpu_gflops: 0,
                gpu_determinism_class: String::new(),
            },
            reach: Reach::default(),
        }
    }

    fn health(t: &PNodeTable, id: &str, at_ms: u32) -> Option<Health> {
        t.health(id, at_ms * MS)
    }

    #[test]
    fn health_follows_heartbeat_silence() {
        let mut t = table();
        t.register(reg("a", 1), Duration::ZERO).unwrap();
        assert_eq!(health(&t, "a", 199), Some(Health::Healthy));
        assert_eq!(health(&t, "a", 200), Some(Health::Suspect), "two intervals of silence");
        assert_eq!(health(&t, "a", 500), Some(Health::Lost), "the timeout");
        // A heartbeat before the timeout ends the silence.
        assert_eq!(t.heartbeat("a", 3, false, 450 * MS), Beat::Alive);
        assert_eq!(health(&t, "a", 500), Some(Health::Healthy));
        assert_eq!(t.lookup("a", 500 * MS).map(|v| (v.health, v.hosted_vnodes)), Some((Health::Healthy, 3)));
        // A time before the last heartbeat is no silence, not a panic.
        assert_eq!(health(&t, "a", 10), Some(Health::Healthy));
        assert_eq!(health(&t, "nobody", 0), None);
        assert_eq!(t.heartbeat("nobody", 0, false, Duration::ZERO), Beat::Unknown);
    }

    #[test]
    fn long_silent_pnodes_are_dropped_and_only_blank_identities_forgotten() {
        let mut t = table();
        for id in ["throwaway", "cheat", "alive"] {
            t.register(reg(id, 1), Duration::ZERO).unwrap();
        }
        t.record_outcome("cheat", &Outcome::Invalid("wrong sum".into()));
        assert_eq!(t.heartbeat("alive", 0, false, 400 * MS), Beat::Alive);
        assert_eq!(t.evict_dead(700 * MS, 750 * MS), (0, 0), "nobody silent that long yet");
        assert_eq!(t.evict_dead(700 * MS, 450 * MS), (2, 1));
        assert!(t.lookup("alive", 700 * MS).is_some(), "a PNode heard from recently stays");
        assert!(t.lookup("throwaway", 700 * MS).is_none() && t.lookup("cheat", 700 * MS).is_none());
        assert!(t.trust().get("throwaway").is_none(), "nothing worth keeping");
        assert_eq!(t.trust().get("cheat").map(|r| r.invalid), Some(1), "a strike outlives the record");
    }

    #[test]
    fn a_lost_pnode_that_heartbeats_is_forgotten_and_may_register_anew() {
        let mut t = table();
        t.register(reg("silent", 1), Duration::ZERO).unwrap();
        t.register(reg("probed", 1), Duration::ZERO).unwrap();
        assert!(t.mark_lost("probed") && !t.mark_lost("probed"), "declared once");
        assert_eq!(health(&t, "probed", 1), Some(Health::Lost), "at once, whatever its heartbeats say");
        assert_eq!(t.heartbeat("probed", 0, false, 2 * MS), Beat::Forgotten);
        assert_eq!(t.heartbeat("silent", 0, false, 600 * MS), Beat::Forgotten, "lost by silence");
        assert!(t.is_empty());
        assert_eq!(t.heartbeat("silent", 0, false, 601 * MS), Beat::Unknown);
        t.register(reg("silent", 1), 700 * MS).unwrap();
        assert_eq!(health(&t, "silent", 701), Some(Health::Healthy));
    }

    #[test]
    fn a_draining_pnode_gets_no_work_and_is_lost_when_silent() {
        let mut t = table();
        t.register(reg("a", 1), Duration::ZERO).unwrap();
        t.register(reg("bb", 1), Duration::ZERO).unwrap();
        assert_eq!(t.drain("a"), Some("http://10.0.0.1:7071".to_string()));
        assert_eq!(t.drain("nobody"), None);
        assert_eq!(health(&t, "a", 250), Some(Health::Draining), "suspect or not, it is leaving");
        assert_eq!(health(&t, "a", 500), Some(Health::Lost), "silence outranks leaving");
        let c = t.candidates(10 * MS, &Eligibility::default());
        assert_eq!((c.suitable, c.offers.iter().map(|o| o.pnode.as_str()).collect::<Vec<_>>()), (1, vec!["bb"]));
    }

    #[test]
    fn a_relayed_pnode_gets_work_only_while_it_listens_at_its_relay() {
        let mut t = table();
        let relayed = Reach { relayed_via: Some("10.0.0.9:7071".into()), ..Reach::default() };
        t.register(Registration { reach: relayed, ..reg("nat", 1) }, Duration::ZERO).unwrap();
        t.register(reg("bb", 1), Duration::ZERO).unwrap();
        let offered = |t: &mut PNodeTable, at: u32| -> Vec<String> {
            t.candidates(at * MS, &Eligibility::default()).offers.iter().map(|o| o.pnode.clone()).collect()
        };
        assert_eq!(offered(&mut t, 1), vec!["bb"], "not listening yet");
        t.heartbeat("nat", 0, true, 100 * MS);
        t.heartbeat("bb", 0, false, 100 * MS);
        assert_eq!(offered(&mut t, 100), vec!["bb", "nat"]);
        assert!(t.candidates(100 * MS, &Eligibility::default()).offers.iter().any(|o| o.relayed));
        t.heartbeat("nat", 0, false, 200 * MS);
        assert_eq!(offered(&mut t, 200), vec!["bb"], "its relay connection dropped");
        let stranded = Reach { unreachable: true, ..Reach::default() };
        t.register(Registration { reach: stranded, ..reg("lost-behind-nat", 1) }, 200 * MS).unwrap();
        assert_eq!(offered(&mut t, 200), vec!["bb"], "behind NAT with no relay");
    }

    #[test]
    fn a_pnode_behind_nat_gets_the_orchestrators_relay_or_the_least_loaded_offered_one() {
        let view = |i, offer: Option<&str>, via: Option<&str>, health| PNodeView {
            reach: Reach {
                relay_offer: offer.map(str::to_string),
                relayed_via: via.map(str::to_string),
                relay_listening: true,
                unreachable: false,
            },
            ..test_view(i, health)
        };
        let pnodes = [
            view(1, Some("r1:1"), None, Health::Healthy),
            view(2, Some("r2:1"), None, Health::Healthy),
            view(3, None, Some("r1:1"), Health::Healthy),
            view(4, Some("r4:1"), None, Health::Lost),
        ];
        assert_eq!(choose_relay(Some("own:1"), &pnodes, "p9").as_deref(), Some("own:1"));
        assert_eq!(choose_relay(None, &pnodes, "p9").as_deref(), Some("r2:1"), "r1 already carries p3");
        assert_eq!(choose_relay(None, &pnodes, "p2").as_deref(), Some("r1:1"), "never its own relay");
        assert_eq!(choose_relay(None, &pnodes[2..], "p9"), None, "only a lost pnode offers one");
    }

    #[test]
    fn a_quarantined_identity_is_refused_and_gets_no_work() {
        let mut t = table();
        t.register(reg("cheat", 1), Duration::ZERO).unwrap();
        t.register(reg("ok", 1), Duration::ZERO).unwrap();
        let bad = Outcome::Invalid("NaN".into());
        assert_eq!(t.record_outcome("cheat", &bad), Transition::None);
        assert!(matches!(t.record_outcome("cheat", &bad), Transition::Quarantined(_)));
        let v = t.lookup("cheat", MS).unwrap();
        assert_eq!(v.standing, Standing::Quarantined, "the view follows the book at once");
        assert!(v.quarantine_reason.is_some_and(|r| r.contains("NaN")) && v.reputation < 1.0);
        let c = t.candidates(MS, &Eligibility::default());
        assert_eq!((c.suitable, c.offers.len()), (1, 1));
        match t.register(reg("cheat", 1), 2 * MS) {
            Err(Refused::Quarantined { id, reason }) => assert!(id == "cheat" && reason.contains("NaN"), "{reason}"),
            other => panic!("a quarantined identity registered: {other:?}"),
        }
        // Registering again keeps the reputation: the listing still says quarantined.
        assert_eq!(t.list(3 * MS).iter().find(|v| v.id == "cheat").map(|v| v.standing), Some(Standing::Quarantined));
        assert_eq!(t.register(reg("ok", 1), 3 * MS), Ok(Standing::New));
    }

    #[test]
    fn candidates_apply_the_eligibility_filter_and_reservations() {
        let mut t = table();
        for id in ["a", "bb", "ccc"] {
            t.register(reg(id, 1), Duration::ZERO).unwrap();
        }
        let mut gpu = reg("dddd", 0);
        gpu.caps.gpu = "rtx".into();
        gpu.caps.determinism_class = "c2".into();
        gpu.caps.gpu_determinism_class = "wgpu/rtx".into();
        t.register(gpu, Duration::ZERO).unwrap();
        let ids = |t: &mut PNodeTable, req: &Eligibility| {
            let c = t.candidates(MS, req);
            (c.suitable, c.offers.iter().map(|o| o.pnode.clone()).collect::<Vec<_>>())
        };
        assert_eq!(ids(&mut t, &Eligibility::default()).0, 4);
        let gpus = Eligibility { target: Target::Gpu, ..Eligibility::default() };
        assert_eq!(ids(&mut t, &gpus), (1, vec!["dddd".to_string()]));
        let class = Eligibility { class: Some("c1".into()), exclude: ["a".to_string()].into(), ..Default::default() };
        assert_eq!(ids(&mut t, &class), (3, vec!["bb".to_string(), "ccc".to_string()]), "excluded still count");
        // A GPU PNode's work is in its GPU's class when the job computes there, else its CPU's:
        // a replica of GPU work finds it by the one, of CPU work by the other.
        let on_gpu = Eligibility { class: Some("wgpu/rtx".into()), ..Default::default() };
        assert_eq!(ids(&mut t, &on_gpu), (1, vec!["dddd".to_string()]));
        let on_cpu = Eligibility { target: Target::Cpu, class: Some("c2".into()), ..Default::default() };
        assert_eq!(ids(&mut t, &on_cpu), (1, vec!["dddd".to_string()]));
        let cpu_class_of_gpu_work = Eligibility { class: Some("c2".into()), ..Default::default() };
        assert_eq!(ids(&mut t, &cpu_class_of_gpu_work).0, 0);
        let hosts = t.hosts_of(&["bb".to_string(), "nobody".to_string()].into());
        assert_eq!(hosts, ["10.0.0.2".to_string()].into());
        let replica = Eligibility { avoid_hosts: hosts, ..Default::default() };
        assert_eq!(ids(&mut t, &replica).1, vec!["a", "ccc", "dddd"]);

        // Reservations shrink the offer; a full PNode is offered no more; unknown memory never fills.
        assert!(t.reserve("a", 1 << 29));
        let offer = |t: &mut PNodeTable, id: &str| {
            t.candidates(MS, &Eligibility::default()).offers.iter().find(|o| o.pnode == id).map(|o| o.memory)
        };
        assert_eq!(offer(&mut t, "a"), Some(1 << 29));
        assert!(!t.reserve("a", (1 << 29) + 1), "more than is left");
        assert!(t.reserve("a", 1 << 29));
        assert_eq!(offer(&mut t, "a"), None);
        t.release("a", 1 << 28);
        assert_eq!(offer(&mut t, "a"), Some(1 << 28));
        assert!(t.reserve("dddd", u64::MAX) && offer(&mut t, "dddd") == Some(0));
        assert!(!t.reserve("nobody", 1));
    }

    proptest::proptest! {
        /// The table's fast scan admits exactly what the pure filter admits over its listing.
        #[test]
        fn candidates_are_the_eligible_pnodes_of_the_listing(
            pnodes in proptest::collection::vec((0u8..4, 0u8..3, 0u8..2, 0u8..5, 0u64..3), 1..40),
            exclude in proptest::collection::btree_set(0usize..40, 0..6),
            avoid in proptest::collection::btree_set(0u8..4, 0..3),
            class in proptest::option::of(0u8..3),
            gpu_only in proptest::bool::ANY,
        ) {
            let mut t = table();
            for (i, &(host, cls, gpu, fate, gib)) in pnodes.iter().enumerate() {
                let mut r = reg(&format!("p{i}"), gib);
                // Hosts differ in case only sometimes: matching ignores it.
                r.endpoint = format!("http://{}{host}.example:7071", if i % 2 == 0 { "H" } else { "h" });
                r.caps.determinism_class = format!("c{cls}");
                r.caps.gpu = if gpu == 1 { "gpu".into() } else { String::new() };
                t.register(r, Duration::ZERO).unwrap();
                match fate {
                    1 => { t.mark_lost(&format!("p{i}")); }
                    2 => { t.drain(&format!("p{i}")); }
                    3 => {
                        for _ in 0..2 {
                            t.record_outcome(&format!("p{i}"), &Outcome::Invalid("x".into()));
                        }
                    }
                    4 => { t.reserve(&format!("p{i}"), gib << 30); }
                    _ => {}
                }
            }
            let req = Eligibility {
                target: if gpu_only { Target::Gpu } else { Target::Any },
                class: class.map(|c| format!("c{c}")),
                exclude: exclude.iter().map(|i| format!("p{i}")).collect(),
                avoid_hosts: avoid.iter().map(|h| format!("h{h}.example")).collect(),
            };
            let listed = t.list(MS);
            let full = |id: &str| t.records.get(id).is_some_and(Record::full);
            let want: Vec<String> =
                listed.iter().filter(|v| placement::eligible(v, &req) && !full(&v.id)).map(|v| v.id.clone()).collect();
            let suitable = listed.iter().filter(|v| placement::suitable(v, &req)).count();
            let c = t.candidates(MS, &req);
            let got: Vec<String> = c.offers.iter().map(|o| o.pnode.clone()).collect();
            proptest::prop_assert_eq!((c.suitable, got), (suitable, want));
        }
    }

    #[test]
    fn the_footprint_counts_every_record() {
        let mut t = table();
        let empty = t.footprint();
        t.register(reg("a", 1), Duration::ZERO).unwrap();
        let one = t.footprint();
        assert!(one > empty + std::mem::size_of::<PNodeView>() as u64, "{one}");
        t.register(reg("bb", 1), Duration::ZERO).unwrap();
        assert!(t.footprint() > one);
    }
}
