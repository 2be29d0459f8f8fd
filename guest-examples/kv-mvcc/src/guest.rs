//! The wasm32 component glue: WIT imports as the engine's traits, WIT exports
//! delegating to [`crate::command`].

wit_bindgen::generate!({
    world: "state-machine",
    path: "../../wit",
});

use raftvm::machine::types::Level;
use raftvm::machine::{events, leases, log, store};

struct HostStore;

impl crate::host::Store for HostStore {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        store::get(key)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        store::set(key, value)
    }

    fn remove(&mut self, key: &[u8]) {
        store::remove(key)
    }

    fn scan(&self, start: &[u8], end: &[u8], reverse: bool, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        store::scan(start, end, reverse, limit)
    }
}

struct HostLeases;

impl crate::host::Leases for HostLeases {
    fn is_live(&self, id: i64) -> bool {
        leases::is_live(id)
    }

    fn attach(&mut self, id: i64, key: &[u8]) {
        leases::attach(id, key)
    }

    fn detach(&mut self, id: i64, key: &[u8]) {
        leases::detach(id, key)
    }
}

struct HostEvents;

impl crate::host::Events for HostEvents {
    fn emit(&mut self, key: &[u8], event: &[u8]) {
        events::emit(key, event)
    }
}

struct KvMvcc;

impl Guest for KvMvcc {
    fn apply(_ctx: ApplyContext, command: Vec<u8>) -> Result<Vec<u8>, String> {
        crate::command::apply(&mut HostStore, &mut HostLeases, &mut HostEvents, &command)
            .map_err(|e| e.message())
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        crate::command::query(&HostStore, &request).map_err(|e| e.message())
    }

    fn on_lease_revoked(_ctx: ApplyContext, lease: i64, keys: Vec<Vec<u8>>) -> Result<(), String> {
        crate::command::lease_revoked(
            &mut HostStore,
            &mut HostLeases,
            &mut HostEvents,
            lease,
            &keys,
        )
        .map_err(|e| e.message())
    }

    fn on_leader_change(is_leader: bool, term: u64) {
        log::log(
            Level::Debug,
            &format!("kv-mvcc: leader change: is_leader={is_leader} term={term}"),
        );
    }
}

export!(KvMvcc);
