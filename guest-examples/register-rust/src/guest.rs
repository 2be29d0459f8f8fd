//! The WIT bindings: `raftvm:machine/state-machine` on top of the crate's
//! protocol logic.

wit_bindgen::generate!({
    world: "state-machine",
    path: "../../wit",
});

use raftvm::machine::types::Level;
use raftvm::machine::{events, log, store};

/// The store and events imports. All state lives in the store: the host may
/// re-instantiate the component at any time.
struct Imports;

impl crate::Host for Imports {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        store::get(key)
    }
    fn set(&mut self, key: &[u8], value: &[u8]) {
        store::set(key, value)
    }
    fn remove(&mut self, key: &[u8]) {
        store::remove(key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        store::scan(start, end, false, limit)
    }
    fn emit(&mut self, key: &[u8], event: &[u8]) {
        events::emit(key, event)
    }
}

struct Register;

impl Guest for Register {
    fn apply(_ctx: ApplyContext, command: Vec<u8>) -> Result<Vec<u8>, String> {
        crate::apply(&mut Imports, &command)
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        crate::query(&Imports, &request)
    }

    fn on_lease_revoked(_ctx: ApplyContext, _lease: i64, keys: Vec<Vec<u8>>) -> Result<(), String> {
        crate::lease_revoked(&mut Imports, &keys);
        Ok(())
    }

    fn on_leader_change(is_leader: bool, term: u64) {
        log::log(Level::Info, &crate::leader_change_message(is_leader, term));
    }
}

export!(Register);
