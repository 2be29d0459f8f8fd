//! openraft glue: the log store, the state-machine driver and the peer network.

pub mod lease;
pub mod link;
pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;
