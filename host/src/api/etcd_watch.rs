//! etcd's `etcdserverpb.Watch` service over the `kv` machine.
//!
//! Live events come from the apply driver (`Shared::events`: each command's events, sent
//! after its batch is committed, on every node alike); history comes from the store
//! through kv-mvcc's query tag 8 (a `WatchCreateRequest` answered by a `WatchResponse`
//! holding the events of `[start_revision, header.revision]`).
//!
//! Every kv write revision emits at least one event, so a watcher sees every revision on
//! the broadcast and keeps `covered`: the revision up to which it has delivered. An event
//! at or below it is old (already read from history); one right after it is delivered; a
//! later one means revisions were missed (the broadcast lagged, or a snapshot was
//! installed), and the watcher reads them from history before going on. A watcher on a
//! follower therefore delivers exactly what a watcher on the leader does, in revision
//! order, without gaps or repeats.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

use super::etcd_kv::{header, kv_query, kv_revision, KV_MACHINE, TAG_RANGE};
use crate::node::Node;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::*;
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::raft::state_machine::CommittedEvents;

/// kv-mvcc's history query (see `guest-examples/kv-mvcc/src/command.rs`).
pub const TAG_WATCH_HISTORY: u8 = 8;

/// etcd's default interval for `progress_notify` watchers.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

/// Responses queued per stream before watchers wait for the client.
const STREAM_BUFFER: usize = 256;

const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;
type Tx = mpsc::Sender<Result<WatchResponse, Status>>;

pub struct WatchService {
    pub node: Arc<Node>,
    /// Set when the server stops: open watch streams end.
    pub stopped: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Stream<WatchResponse>;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(serve_stream(self.node.clone(), req.into_inner(), tx, self.stopped.clone()));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// One watch stream: creates and cancels watchers as the client asks. Watchers end with
/// the stream (client gone, or server stopping).
async fn serve_stream(node: Arc<Node>, mut inbound: Streaming<WatchRequest>, tx: Tx, mut stopped: watch::Receiver<bool>) {
    let mut watchers: HashMap<i64, JoinHandle<()>> = HashMap::new();
    let mut next_id = 0i64;
    loop {
        let req = tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(r)) => r,
                _ => break,
            },
            _ = stopped.wait_for(|v| *v) => break,
            _ = tx.closed() => break,
        };
        watchers.retain(|_, h| !h.is_finished());
        let reply = match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                // Subscribe before reading the revision: nothing committed after it is missed.
                let live = node.shared.events.subscribe();
                let rev = kv_revision(&node).await;
                let spec = Spec::new(&c);
                let id = if spec.is_none() {
                    Err(ERR_EMPTY_RANGE)
                } else if c.watch_id == 0 {
                    // etcd's AutoWatchID: the lowest free id from a per-stream counter.
                    while watchers.contains_key(&next_id) {
                        next_id += 1;
                    }
                    next_id += 1;
                    Ok(next_id - 1)
                } else if watchers.contains_key(&c.watch_id) {
                    Err(ERR_DUPLICATE_ID)
                } else {
                    Ok(c.watch_id)
                };
                let created = WatchResponse {
                    header: Some(header(&node, rev)),
                    watch_id: *id.as_ref().unwrap_or(&-1),
                    created: true,
                    canceled: id.is_err(),
                    cancel_reason: id.err().unwrap_or_default().to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(created)).await.is_err() {
                    break;
                }
                if let (Ok(id), Some(spec)) = (id, spec) {
                    let covered = if c.start_revision > 0 { c.start_revision - 1 } else { rev };
                    // Revisions after `rev` come through `live`; only a start at or below
                    // it has history to read first.
                    let replay = covered < rev;
                    let w = Watcher { node: node.clone(), id, spec, covered, tx: tx.clone(), sent: false };
                    watchers.insert(id, tokio::spawn(w.run(live, replay, c.progress_notify)));
                }
                None
            }
            Some(RequestUnion::CancelRequest(c)) => match watchers.remove(&c.watch_id) {
                Some(h) => {
                    h.abort();
                    let _ = h.await;
                    Some(WatchResponse {
                        header: Some(header(&node, kv_revision(&node).await)),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                }
                None => None, // etcd ignores unknown ids
            },
            Some(RequestUnion::ProgressRequest(_)) => Some(WatchResponse {
                header: Some(header(&node, kv_revision(&node).await)),
                watch_id: -1,
                ..Default::default()
            }),
            None => None,
        };
        if let Some(r) = reply {
            if tx.send(Ok(r)).await.is_err() {
                break;
            }
        }
    }
    for (_, h) in watchers {
        h.abort();
    }
}

/// What a watcher selects, normalised as etcd does.
struct Spec {
    key: Vec<u8>,
    end: End,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
}

enum End {
    /// Only `key`.
    Single,
    /// Every key from `key` on (`range_end` = `\0`).
    Open,
    /// `[key, end)`.
    Before(Vec<u8>),
}

impl Spec {
    /// `None` for an empty range (`key >= range_end`), which etcd refuses.
    fn new(c: &WatchCreateRequest) -> Option<Spec> {
        use watch_create_request::FilterType;
        // An empty key is the smallest key, `\0`.
        let key = if c.key.is_empty() { vec![0] } else { c.key.clone() };
        let end = match c.range_end.as_slice() {
            [] => End::Single,
            [0] => End::Open,
            e if key.as_slice() >= e => return None,
            e => End::Before(e.to_vec()),
        };
        Some(Spec {
            key,
            end,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
        })
    }

    fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            End::Single => k == self.key.as_slice(),
            End::Open => k >= self.key.as_slice(),
            End::Before(e) => k >= self.key.as_slice() && k < e.as_slice(),
        }
    }

    fn wants(&self, e: &Event) -> bool {
        let put = e.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
    }

    /// The history request from `start` (the guest takes the same range encoding).
    fn history(&self, start: i64) -> WatchCreateRequest {
        let range_end = match &self.end {
            End::Single => Vec::new(),
            End::Open => vec![0],
            End::Before(e) => e.clone(),
        };
        WatchCreateRequest { key: self.key.clone(), range_end, start_revision: start, prev_kv: self.prev_kv, ..Default::default() }
    }
}

/// Why a watcher stops.
enum Stop {
    /// The client is gone.
    Gone,
    /// History the watcher needs was compacted; the client was told.
    Compacted,
}

struct Watcher {
    node: Arc<Node>,
    id: i64,
    spec: Spec,
    /// Every revision up to this one has been delivered.
    covered: i64,
    tx: Tx,
    /// Whether anything was sent since the last progress notification.
    sent: bool,
}

impl Watcher {
    async fn run(mut self, mut live: broadcast::Receiver<Arc<CommittedEvents>>, replay: bool, progress_notify: bool) {
        if replay && self.catch_up().await.is_err() {
            return;
        }
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
        loop {
            let r = tokio::select! {
                r = live.recv() => r,
                _ = progress.tick(), if progress_notify => {
                    if !std::mem::take(&mut self.sent) {
                        if self.send(self.covered, Vec::new()).await.is_err() {
                            return;
                        }
                        self.sent = false; // a notification is not an event
                    }
                    continue;
                }
            };
            let step = match r {
                Ok(c) if c.machine == KV_MACHINE => self.on_committed(&c).await,
                Ok(_) => Ok(()),
                // Fell behind the broadcast: read what was missed from the store.
                Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if step.is_err() {
                return;
            }
        }
    }

    /// One command's events, all at one revision.
    async fn on_committed(&mut self, c: &CommittedEvents) -> Result<(), Stop> {
        let Some(rev) = c.events.first().and_then(|(_, e)| Event::decode(e.as_slice()).ok()).and_then(|e| e.kv).map(|kv| kv.mod_revision)
        else {
            return Ok(());
        };
        if rev <= self.covered {
            return Ok(());
        }
        if rev > self.covered + 1 {
            // Revisions were missed (a snapshot was installed): the store has them.
            return self.catch_up().await;
        }
        let mut out = Vec::new();
        for (key, bytes) in &c.events {
            if !self.spec.contains(key) {
                continue;
            }
            let Ok(mut e) = Event::decode(bytes.as_slice()) else { continue };
            if !self.spec.wants(&e) {
                continue;
            }
            if self.spec.prev_kv {
                e.prev_kv = self.prev_kv(key, rev).await;
            }
            out.push(e);
        }
        self.covered = rev;
        if out.is_empty() {
            return Ok(());
        }
        self.send(rev, out).await
    }

    /// The key's value just before `rev`, as etcd fills `prev_kv`: none if there was
    /// none, or if compaction removed it.
    async fn prev_kv(&self, key: &[u8], rev: i64) -> Option<KeyValue> {
        if rev <= 1 {
            return None;
        }
        let r = RangeRequest { key: key.to_vec(), revision: rev - 1, serializable: true, ..Default::default() };
        let found: RangeResponse = kv_query(&self.node, TAG_RANGE, &r, false).await.ok()?;
        found.kvs.into_iter().next()
    }

    /// Deliver every event after `covered` from the store, up to the current revision,
    /// in chunks (kv-mvcc ends an answer early after 1,000 events or 10,000 revisions).
    async fn catch_up(&mut self) -> Result<(), Stop> {
        let target = kv_revision(&self.node).await;
        while self.covered < target {
            let req = self.spec.history(self.covered + 1);
            let resp = match kv_query::<WatchResponse>(&self.node, TAG_WATCH_HISTORY, &req, false).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Err(Stop::Gone);
                }
            };
            if resp.compact_revision != 0 {
                // etcd: the watcher is canceled with the revision it can resume from.
                let r = WatchResponse {
                    header: Some(header(&self.node, 0)),
                    watch_id: self.id,
                    canceled: true,
                    compact_revision: resp.compact_revision,
                    ..Default::default()
                };
                let _ = self.tx.send(Ok(r)).await;
                return Err(Stop::Compacted);
            }
            let upto = resp.header.as_ref().map_or(0, |h| h.revision);
            if upto <= self.covered {
                break; // no progress: the store is behind `target` (a snapshot swap)
            }
            self.covered = upto;
            let events: Vec<Event> = resp.events.into_iter().filter(|e| self.spec.wants(e)).collect();
            if !events.is_empty() {
                self.send(upto, events).await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self, revision: i64, events: Vec<Event>) -> Result<(), Stop> {
        self.sent = true;
        let r = WatchResponse { header: Some(header(&self.node, revision)), watch_id: self.id, events, ..Default::default() };
        self.tx.send(Ok(r)).await.map_err(|_| Stop::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &[u8], range_end: &[u8]) -> Option<Spec> {
        Spec::new(&WatchCreateRequest { key: key.to_vec(), range_end: range_end.to_vec(), ..Default::default() })
    }

    #[test]
    fn ranges_are_normalised_as_etcd_does() {
        let single = spec(b"a", b"").unwrap();
        assert!(single.contains(b"a") && !single.contains(b"ab") && !single.contains(b""));
        let open = spec(b"b", b"\0").unwrap();
        assert!(open.contains(b"b") && open.contains(b"zzz") && !open.contains(b"a"));
        let prefix = spec(b"p/", b"p0").unwrap();
        assert!(prefix.contains(b"p/") && prefix.contains(b"p/x") && !prefix.contains(b"p0") && !prefix.contains(b"p"));
        // An empty key is `\0`: with `\0` as range_end, every key.
        let all = spec(b"", b"\0").unwrap();
        assert!(all.contains(b"\0") && all.contains(b"a"));
        assert_eq!(all.history(5).key, vec![0]);
        assert_eq!(all.history(5).range_end, vec![0]);
        assert_eq!(all.history(5).start_revision, 5);
        // key >= range_end is an empty range.
        assert!(spec(b"b", b"a").is_none() && spec(b"b", b"b").is_none());
    }

    #[test]
    fn filters_drop_puts_or_deletes() {
        use watch_create_request::FilterType;
        let put = Event { r#type: EventType::Put as i32, ..Default::default() };
        let del = Event { r#type: EventType::Delete as i32, ..Default::default() };
        let s = |filters: Vec<i32>| Spec::new(&WatchCreateRequest { key: b"k".to_vec(), filters, ..Default::default() }).unwrap();
        let none = s(vec![]);
        assert!(none.wants(&put) && none.wants(&del));
        let no_put = s(vec![FilterType::Noput as i32]);
        assert!(!no_put.wants(&put) && no_put.wants(&del));
        let no_delete = s(vec![FilterType::Nodelete as i32]);
        assert!(no_delete.wants(&put) && !no_delete.wants(&del));
    }
}
