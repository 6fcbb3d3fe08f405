//! The mesh's event log: typed, append-only, bounded, and pushed to subscribers as it grows.
//!
//! An event's kind is data (a short snake_case string such as `pnode_joined`), not an enum
//! variant, so a new kind is one `push` call away and every reader (the dashboard's timeline,
//! `/api/events`, the SSE stream) shows it without change. Plain Rust: no actors, no IO.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Events kept in memory by default; older ones are dropped first.
pub const DEFAULT_CAPACITY: usize = 4096;

/// How bad an event is, for colouring and filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine (joins, placements, checkpoints).
    Info,
    /// Worth a look (a PNode went quiet, a retry).
    Warning,
    /// Something failed.
    Error,
}

/// One thing that happened in the mesh.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Position in the log, from 1, never reused.
    pub seq: u64,
    /// Wall-clock time in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened, e.g. `pnode_joined`, `job_failed`, `checkpoint`.
    pub kind: String,
    /// How bad it is.
    pub severity: Severity,
    /// The job it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The PNode it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pnode: Option<String>,
    /// A line for people.
    pub message: String,
    /// Kind-specific fields for programs (null when there are none).
    pub data: serde_json::Value,
}

/// An event about to be pushed; the log assigns `seq` and `at_ms`.
#[derive(Debug, Clone)]
pub struct NewEvent {
    kind: String,
    severity: Severity,
    job: Option<String>,
    pnode: Option<String>,
    message: String,
    data: serde_json::Value,
}

impl NewEvent {
    /// An informational event of `kind`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            severity: Severity::Info,
            job: None,
            pnode: None,
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }

    /// The kind it will be pushed as.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Sets the severity.
    pub fn severity(mut self, s: Severity) -> NewEvent {
        self.severity = s;
        self
    }

    /// Names the job it concerns.
    pub fn job(mut self, job: impl Into<String>) -> NewEvent {
        self.job = Some(job.into());
        self
    }

    /// Names the PNode it concerns.
    pub fn pnode(mut self, pnode: impl Into<String>) -> NewEvent {
        self.pnode = Some(pnode.into());
        self
    }

    /// Attaches machine-readable fields.
    pub fn data(mut self, data: serde_json::Value) -> NewEvent {
        self.data = data;
        self
    }
}

struct Ring {
    next_seq: u64,
    capacity: usize,
    events: VecDeque<Event>,
}

/// A cheap-to-clone handle on the log; every clone sees the same events.
#[derive(Clone)]
pub struct EventLog {
    ring: Arc<Mutex<Ring>>,
    tx: broadcast::Sender<Event>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").field("last_seq", &self.last_seq()).finish()
    }
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(DEFAULT_CAPACITY)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl EventLog {
    /// An empty log keeping at most `capacity` events.
    pub fn new(capacity: usize) -> EventLog {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(1024);
        EventLog { ring: Arc::new(Mutex::new(Ring { next_seq: 1, capacity, events: VecDeque::new() })), tx }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves a consistent ring (every mutation is one push
        // or pop), so a poisoned lock is still safe to use.
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an event, logs it with tracing, and tells subscribers; returns it.
    pub fn push(&self, e: NewEvent) -> Event {
        let event = {
            let mut r = self.ring();
            let event = Event {
                seq: r.next_seq,
                at_ms: now_ms(),
                kind: e.kind,
                severity: e.severity,
                job: e.job,
                pnode: e.pnode,
                message: e.message,
                data: e.data,
            };
            r.next_seq += 1;
            if r.events.len() == r.capacity {
                r.events.pop_front();
            }
            r.events.push_back(event.clone());
            // Sent under the lock so subscribers see events in `seq` order.
            let _ = self.tx.send(event.clone());
            event
        };
        crate::metrics::ORCHESTRATOR.event(&event.kind);
        tracing::debug!(kind = %event.kind, seq = event.seq, "{}", event.message);
        event
    }

    /// Events with `seq > after`, oldest first, at most `limit` of them (the newest ones when
    /// more match), optionally only those of one job.
    pub fn since(&self, after: u64, limit: usize, job: Option<&str>) -> Vec<Event> {
        let r = self.ring();
        let matching: Vec<&Event> =
            r.events.iter().filter(|e| e.seq > after && job.is_none_or(|j| e.job.as_deref() == Some(j))).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }

    /// Sequence number of the newest event (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.ring().next_seq - 1
    }

    /// Events kept now.
    pub fn len(&self) -> usize {
        self.ring().events.len()
    }

    /// Whether no event is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events pushed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_in_order_and_numbers_them_for_good() {
        let log = EventLog::new(3);
        for i in 0..5 {
            log.push(NewEvent::new("tick", format!("t{i}")).job(if i % 2 == 0 { "a" } else { "b" }));
        }
        let all = log.since(0, 100, None);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(all[0].message, "t2");
        assert_eq!(log.last_seq(), 5);
        assert_eq!(log.since(4, 100, None).len(), 1);
        assert_eq!(log.since(0, 1, None)[0].seq, 5, "the limit keeps the newest");
        assert_eq!(log.since(0, 100, Some("a")).iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 5]);
    }

    #[test]
    fn subscribers_receive_new_kinds_without_any_registration() {
        let log = EventLog::default();
        let mut rx = log.subscribe();
        log.push(NewEvent::new("brand_new_kind", "x").severity(Severity::Warning).data(serde_json::json!({"n": 1})));
        let e = rx.try_recv().expect("event delivered");
        assert_eq!(e.kind, "brand_new_kind");
        let json = serde_json::to_value(&e).expect("serializable");
        assert_eq!(json["severity"], "warning");
        assert_eq!(json["data"]["n"], 1);
        assert!(json.get("job").is_none());
    }
}
