//! The orchestrators this PNode is a member of, and which one each hosted job answers to.
//!
//! A PNode registers with every orchestrator it knows (`membership`). Each allocation names
//! the orchestrator instance that made it; that job's reports, Resolves and dataset fetch then
//! go to that orchestrator, and only its jobs are released when it forgets this PNode or falls
//! silent. The table is plain data behind a lock: it does no IO.

use crate::membership::OrchestratorLink;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

/// Why an allocation's orchestrator cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// It names an instance this PNode has not joined (or has left).
    #[error("this pnode is not a member of orchestrator instance {0:?} (members: {1})")]
    NotMember(String, String),
    /// It names none, and this PNode is a member of several.
    #[error("the request names no orchestrator instance, and this pnode is a member of {0}")]
    Ambiguous(usize),
    /// This PNode is a member of none at the moment.
    #[error("this pnode is not a member of any orchestrator at the moment")]
    NoMember,
}

/// Shared handle to the table; clones see the same table. `L` is how a member is reached (a
/// link; anything in tests).
pub struct Orchestrators<L = OrchestratorLink> {
    inner: Arc<RwLock<Table<L>>>,
}

impl<L> Clone for Orchestrators<L> {
    fn clone(&self) -> Self {
        Orchestrators { inner: self.inner.clone() }
    }
}

impl<L> Default for Orchestrators<L> {
    fn default() -> Self {
        Orchestrators { inner: Arc::new(RwLock::new(Table { members: BTreeMap::new(), jobs: HashMap::new() })) }
    }
}

struct Table<L> {
    /// Instance id → the URL it was joined at, and the link to it.
    members: BTreeMap<String, (String, L)>,
    /// Job → the instance that allocated what this PNode hosts of it.
    jobs: HashMap<String, String>,
}

impl<L: Clone> Orchestrators<L> {
    /// An empty table.
    pub fn new() -> Orchestrators<L> {
        Orchestrators::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table<L>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table<L>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Records membership of instance `id`, joined at `url` through `link`. Returns false,
    /// changing nothing, when `id` is a member already at another URL (two URLs of one instance).
    pub fn join(&self, id: &str, url: &str, link: L) -> bool {
        let mut t = self.write();
        match t.members.get(id) {
            Some((u, _)) if u != url => false,
            _ => {
                t.members.insert(id.to_string(), (url.to_string(), link));
                true
            }
        }
    }

    /// Ends membership of `id`: its jobs answer to nobody and are returned, for release.
    pub fn leave(&self, id: &str) -> Vec<String> {
        let mut t = self.write();
        t.members.remove(id);
        Self::take_jobs(&mut t, id)
    }

    /// Ends the membership joined at `url`, if any, as [`Orchestrators::leave`] does.
    pub fn leave_joined_at(&self, url: &str) -> Vec<String> {
        let id = self.read().members.iter().find(|(_, (u, _))| u == url).map(|(id, _)| id.clone());
        id.map(|id| self.leave(&id)).unwrap_or_default()
    }

    /// The jobs allocated by `id`, forgotten here, for release (`id` stays a member).
    pub fn forget_jobs_of(&self, id: &str) -> Vec<String> {
        Self::take_jobs(&mut self.write(), id)
    }

    fn take_jobs(t: &mut Table<L>, id: &str) -> Vec<String> {
        let mut gone: Vec<String> = t.jobs.iter().filter(|(_, o)| o.as_str() == id).map(|(j, _)| j.clone()).collect();
        gone.sort();
        t.jobs.retain(|_, o| o != id);
        gone
    }

    /// The member an allocation naming `id` comes from: `id` itself, or, for an empty `id`, the
    /// only member there is.
    pub fn member(&self, id: &str) -> Result<(String, L), RouteError> {
        let t = self.read();
        if id.is_empty() {
            return match t.members.len() {
                0 => Err(RouteError::NoMember),
                1 => t.members.iter().next().map(|(i, (_, l))| (i.clone(), l.clone())).ok_or(RouteError::NoMember),
                n => Err(RouteError::Ambiguous(n)),
            };
        }
        match t.members.get(id) {
            Some((_, l)) => Ok((id.to_string(), l.clone())),
            None => {
                Err(RouteError::NotMember(id.to_string(), t.members.keys().cloned().collect::<Vec<_>>().join(", ")))
            }
        }
    }

    /// Job `job` answers to member `id` from now on.
    pub fn assign(&self, job: &str, id: &str) {
        self.write().jobs.insert(job.to_string(), id.to_string());
    }

    /// Whether `job` may be released at the request of instance `id`: it is not hosted for
    /// another instance (an empty `id` releases whatever is hosted).
    pub fn may_release(&self, job: &str, id: &str) -> bool {
        id.is_empty() || self.read().jobs.get(job).is_none_or(|o| o == id)
    }

    /// `job` left this PNode.
    pub fn released(&self, job: &str) {
        self.write().jobs.remove(job);
    }

    /// The orchestrator `job` answers to, with its instance id.
    pub fn for_job(&self, job: &str) -> Option<(String, L)> {
        let t = self.read();
        let id = t.jobs.get(job)?;
        Some((id.clone(), t.members.get(id)?.1.clone()))
    }

    /// Whether `id` is a member.
    pub fn is_member(&self, id: &str) -> bool {
        self.read().members.contains_key(id)
    }

    /// Every member, by instance id.
    pub fn members(&self) -> Vec<(String, L)> {
        self.read().members.iter().map(|(i, (_, l))| (i.clone(), l.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Orchestrators<String> {
        Orchestrators::new()
    }

    #[test]
    fn jobs_answer_to_the_orchestrator_that_allocated_them_and_leave_with_it() {
        let t = table();
        assert!(t.join("a", "https://a:1", "https://a:1".to_string()));
        assert!(t.join("b", "https://b:1", "https://b:1".to_string()));
        t.assign("j1", "a");
        t.assign("j2", "b");
        t.assign("j3", "a");
        assert_eq!(t.for_job("j2"), Some(("b".into(), "https://b:1".into())));
        // j1 was taken over by b: it no longer leaves with a.
        t.assign("j1", "b");
        assert_eq!(t.leave("a"), vec!["j3".to_string()]);
        assert!(t.for_job("j3").is_none());
        assert!(!t.is_member("a"));
        assert_eq!(t.for_job("j1").map(|(i, _)| i), Some("b".into()));
        assert_eq!(t.forget_jobs_of("b"), vec!["j1".to_string(), "j2".to_string()]);
        assert!(t.is_member("b"), "forgetting jobs keeps the membership");
        t.assign("j4", "b");
        assert_eq!(t.leave_joined_at("https://b:1"), vec!["j4".to_string()]);
        assert!(t.members().is_empty());
    }

    #[test]
    fn an_allocation_must_name_a_member_unless_there_is_only_one() {
        let t = table();
        assert_eq!(t.member("").err(), Some(RouteError::NoMember));
        t.join("a", "https://a:1", "https://a:1".to_string());
        assert_eq!(t.member("").map(|(i, _)| i), Ok("a".into()));
        assert_eq!(t.member("a").map(|(i, _)| i), Ok("a".into()));
        assert!(matches!(t.member("z"), Err(RouteError::NotMember(..))));
        t.join("b", "https://b:1", "https://b:1".to_string());
        assert_eq!(t.member("").err(), Some(RouteError::Ambiguous(2)));
    }

    #[test]
    fn a_second_url_of_a_member_is_not_a_second_membership() {
        let t = table();
        assert!(t.join("a", "https://a:1", "https://a:1".to_string()));
        assert!(!t.join("a", "https://10.0.0.1:1", "https://10.0.0.1:1".to_string()));
        assert!(t.join("a", "https://a:1", "https://a:1".to_string()), "the same link may join again");
        assert_eq!(t.members().len(), 1);
    }

    #[test]
    fn only_the_allocating_orchestrator_releases_a_job() {
        let t = table();
        t.join("a", "https://a:1", "https://a:1".to_string());
        t.join("b", "https://b:1", "https://b:1".to_string());
        t.assign("j", "b");
        assert!(!t.may_release("j", "a"), "a lost the job to b");
        assert!(t.may_release("j", "b"));
        assert!(t.may_release("j", ""));
        assert!(t.may_release("other", "a"), "nothing hosted: nothing to protect");
        t.released("j");
        assert!(t.may_release("j", "a"));
    }
}
