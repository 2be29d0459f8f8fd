//! What the MVCC engine needs from its environment, as traits, so the same
//! code runs against the WIT imports (in the wasm guest) and against the
//! in-memory implementations below (native tests).

use std::collections::{BTreeMap, BTreeSet};

/// The machine's private ordered byte store, with the semantics of the WIT
/// `store` interface.
pub trait Store {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn set(&mut self, key: &[u8], value: &[u8]);
    fn remove(&mut self, key: &[u8]);
    /// Entries with `start <= key < end` in key order (descending when
    /// `reverse`), at most `limit` of them. An empty `end` means no upper
    /// bound.
    fn scan(&self, start: &[u8], end: &[u8], reverse: bool, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)>;
}

/// Host-owned leases (WIT `leases`).
pub trait Leases {
    fn is_live(&self, id: i64) -> bool;
    fn attach(&mut self, id: i64, key: &[u8]);
    fn detach(&mut self, id: i64, key: &[u8]);
}

/// Watch event sink (WIT `events`). `event` is an encoded `mvccpb.Event`.
pub trait Events {
    fn emit(&mut self, key: &[u8], event: &[u8]);
}

/// A `BTreeMap` store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStore {
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.map.insert(key.to_vec(), value.to_vec());
    }

    fn remove(&mut self, key: &[u8]) {
        self.map.remove(key);
    }

    fn scan(&self, start: &[u8], end: &[u8], reverse: bool, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        use std::ops::Bound;
        if !end.is_empty() && end <= start {
            return Vec::new();
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let range = self.map.range::<[u8], _>((Bound::Included(start), upper));
        let take = |it: &mut dyn Iterator<Item = (&Vec<u8>, &Vec<u8>)>| {
            it.take(limit as usize)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if reverse {
            take(&mut range.rev())
        } else {
            take(&mut range.into_iter())
        }
    }
}

/// Leases held in memory: which ids are live and which keys were attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemLeases {
    pub live: BTreeSet<i64>,
    pub attached: BTreeMap<i64, BTreeSet<Vec<u8>>>,
}

impl MemLeases {
    pub fn with_live(ids: impl IntoIterator<Item = i64>) -> Self {
        MemLeases {
            live: ids.into_iter().collect(),
            attached: BTreeMap::new(),
        }
    }

    /// Keys attached to `id`, sorted.
    pub fn keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.attached
            .get(&id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Leases for MemLeases {
    fn is_live(&self, id: i64) -> bool {
        self.live.contains(&id)
    }

    fn attach(&mut self, id: i64, key: &[u8]) {
        self.attached.entry(id).or_default().insert(key.to_vec());
    }

    fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(keys) = self.attached.get_mut(&id) {
            keys.remove(key);
            if keys.is_empty() {
                self.attached.remove(&id);
            }
        }
    }
}

/// Collected events, `(key, encoded mvccpb.Event)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemEvents {
    pub events: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Events for MemEvents {
    fn emit(&mut self, key: &[u8], event: &[u8]) {
        self.events.push((key.to_vec(), event.to_vec()));
    }
}

/// A whole in-memory node, with the host's commit rules: a command's store
/// writes, lease changes and events are kept only if it returns `Ok`.
#[derive(Debug, Clone, Default)]
pub struct MemNode {
    pub store: MemStore,
    pub leases: MemLeases,
    pub events: MemEvents,
}

impl MemNode {
    pub fn new() -> Self {
        Self::default()
    }

    /// `apply` of a tagged command (see [`crate::command`]).
    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        self.transactional(|n| {
            crate::command::apply(&mut n.store, &mut n.leases, &mut n.events, command)
        })
    }

    /// `query` of a tagged request.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        crate::command::query(&self.store, request).map_err(|e| e.message())
    }

    /// `on-lease-revoked` with the keys the lease registry holds for `lease`;
    /// the lease is then no longer live.
    pub fn revoke(&mut self, lease: i64) -> Result<(), String> {
        let keys = self.leases.keys(lease);
        let r = self.transactional(|n| {
            crate::command::lease_revoked(&mut n.store, &mut n.leases, &mut n.events, lease, &keys)
        });
        if r.is_ok() {
            self.leases.live.remove(&lease);
            self.leases.attached.remove(&lease);
        }
        r
    }

    fn transactional<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> crate::error::Result<T>,
    ) -> Result<T, String> {
        let before = self.clone();
        match f(self) {
            Ok(v) => Ok(v),
            Err(e) => {
                *self = before;
                Err(e.message())
            }
        }
    }
}
