//! The raftvm admin service: modules, generic call/query, replica hashes, status.

use std::sync::Arc;

use tonic::{Request as Req, Response as Resp, Status};

use super::{apply_status, node_status};
use crate::node::Node;
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::*;
use crate::runtime::{DEFAULT_FUEL, DEFAULT_MEMORY_BYTES};
use crate::types::{validate_machine_name, Request, Response};

pub struct AdminService {
    pub node: Arc<Node>,
}

/// Ceiling on what an install may ask for, so one module cannot take a node's memory.
const MAX_MEMORY_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// How long the receiving member waits for the others to compile a module before it
/// proposes the install anyway (register-py, 18 MB of CPython, takes ~5.5 s on its own on
/// a 2-core machine, longer while others compile too).
const PRECOMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn unexpected(r: Response) -> Status {
    Status::internal(format!("unexpected apply result {r:?}"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn install_module(&self, req: Req<InstallModuleRequest>) -> Result<Resp<InstallModuleResponse>, Status> {
        let r = req.into_inner();
        validate_machine_name(&r.name).map_err(Status::invalid_argument)?;
        let memory_bytes = if r.memory_bytes == 0 { DEFAULT_MEMORY_BYTES } else { r.memory_bytes };
        if memory_bytes > MAX_MEMORY_BYTES {
            return Err(Status::invalid_argument(format!("memory limit {memory_bytes} is over {MAX_MEMORY_BYTES}")));
        }
        let fuel = if r.fuel == 0 { DEFAULT_FUEL } else { r.fuel };
        // Validate here, before anything is proposed: a bad module never reaches the log.
        let shared = self.node.shared.clone();
        let wasm = tokio::task::spawn_blocking(move || shared.runtime.validate(&r.wasm))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("invalid module: {e}")))?;
        // Every other member compiles it now, in parallel, rather than when it applies the
        // install: there a compile (seconds for a JavaScript or Python guest) would hold up
        // every later entry of every machine on that member.
        let ready = self.node.precompile_on_peers(&wasm, PRECOMPILE_TIMEOUT).await;
        tracing::debug!(name = %r.name, members = ready, "module compiled on other members");
        let (resp, index) = self
            .node
            .propose(Request::InstallModule { name: r.name, wasm, fuel, memory_bytes })
            .await
            .map_err(node_status)?;
        match resp {
            Response::Installed { sha256, size } => Ok(Resp::new(InstallModuleResponse { sha256, size, index })),
            Response::Failed(e) => Err(apply_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn list_modules(&self, req: Req<ListModulesRequest>) -> Result<Resp<ListModulesResponse>, Status> {
        if !req.into_inner().serializable {
            self.node.read_barrier().await.map_err(node_status)?;
        }
        let records = self.node.shared.db().modules().map_err(|e| Status::internal(format!("{e:#}")))?;
        let modules = records
            .into_iter()
            .map(|m| ModuleInfo {
                name: m.name,
                sha256: m.sha256,
                size: m.size,
                fuel: m.fuel,
                memory_bytes: m.memory_bytes,
                installed_index: m.installed_index,
            })
            .collect();
        Ok(Resp::new(ListModulesResponse { modules }))
    }

    async fn remove_module(&self, req: Req<RemoveModuleRequest>) -> Result<Resp<RemoveModuleResponse>, Status> {
        let name = req.into_inner().name;
        let (resp, index) = self.node.propose(Request::RemoveModule { name }).await.map_err(node_status)?;
        match resp {
            Response::Removed => Ok(Resp::new(RemoveModuleResponse { index })),
            Response::Failed(e) => Err(apply_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn call(&self, req: Req<CallRequest>) -> Result<Resp<CallResponse>, Status> {
        let r = req.into_inner();
        // No local "is it installed?" check: this node may not have applied an install the
        // client already saw acknowledged. Apply answers NoSuchMachine, identically everywhere.
        let (resp, index) = self
            .node
            .propose(Request::Call { machine: r.machine, payload: r.payload, timestamp_ms: 0 })
            .await
            .map_err(node_status)?;
        match resp {
            Response::Output(output) => Ok(Resp::new(CallResponse { output, index })),
            Response::Failed(e) => Err(apply_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn query(&self, req: Req<QueryRequest>) -> Result<Resp<QueryResponse>, Status> {
        let r = req.into_inner();
        let out = self.node.query(&r.machine, r.payload, !r.serializable).await.map_err(node_status)?;
        let applied_index = self.node.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        match out {
            Ok(output) => Ok(Resp::new(QueryResponse { output, applied_index })),
            Err(e) => Err(apply_status(e)),
        }
    }

    async fn hash(&self, _req: Req<HashRequest>) -> Result<Resp<HashResponse>, Status> {
        let shared = self.node.shared.clone();
        let (applied, hashes) = tokio::task::spawn_blocking(move || {
            let db = shared.db();
            Ok::<_, anyhow::Error>((db.applied()?, db.hashes()?))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Resp::new(HashResponse {
            applied_index: applied.map(|l| l.index).unwrap_or(0),
            store_hash: hashes.store,
            machines: hashes.machines.into_iter().collect(),
        }))
    }

    async fn status(&self, _req: Req<StatusRequest>) -> Result<Resp<StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow().clone();
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| Member { id: *id, name: n.name.clone(), peer_url: n.peer_url.clone() })
            .collect();
        Ok(Resp::new(StatusResponse {
            member_id: self.node.id,
            name: self.node.name.clone(),
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            cluster_id: self.node.cluster_id,
            members,
            lease_reads: self.node.read_stats.lease.load(std::sync::atomic::Ordering::Relaxed),
            read_index_rounds: self.node.read_stats.rounds.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}
