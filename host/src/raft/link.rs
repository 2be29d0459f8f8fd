//! One long-lived call stream per peer (`RaftPeer.Calls`).
//!
//! Every unary gRPC call opens an HTTP/2 stream: HEADERS both ways, HPACK, the tower
//! service stack and a task on the server. On this project's 2-vCPU test machine that
//! made a small call between two processes take ~123 µs round trip, against ~68 µs for
//! a message and its reply on a stream that stays open (measured with a throwaway echo
//! server; docs/benchmarks.md). A write through a follower makes three such calls in a
//! row (Forward, AppendEntries, the commit's AppendEntries) and a follower's
//! linearizable read two (ReadIndex, the leader's heartbeat round), so the peer calls
//! that are small and frequent travel as frames on one bidirectional stream per peer
//! instead, as etcd's members keep long-lived streams between them.
//!
//! A request frame is `(id, kind, data)` with a [`CallKind`]; its reply carries the same
//! id, `kind` = a gRPC status code (0 = OK, then `data` is the reply; otherwise `data` is
//! the error message). The server answers each frame on a task of its own, so a Forward
//! waiting for its commit does not hold up a heartbeat behind it.
//!
//! What stays unary: snapshots, and any payload over [`STREAM_FRAME_MAX`] (a module
//! install, a catch-up AppendEntries): they would sit in front of heartbeats and votes
//! on the shared stream. A peer that answers `Calls` with Unimplemented (an older build)
//! is called unary from then on.
//!
//! Error meaning, kept from the unary calls: `Unavailable` means the request was not
//! sent (no stream could be opened), so a caller may retry elsewhere without risking a
//! duplicate. A stream that breaks after the frame was queued gives `Unknown`: the peer
//! may have acted on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::proto::peer::raft_peer_client::RaftPeerClient;
use crate::proto::peer::{Blob, Frame, LeaseRequest, ReadIndexRequest};

/// Payloads above this size go as unary calls (see the module docs).
pub const STREAM_FRAME_MAX: usize = 256 * 1024;

/// What a request frame asks for; the numbers are the wire values of `Frame.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    AppendEntries = 1,
    Vote = 2,
    Forward = 3,
    ReadIndex = 4,
    Lease = 5,
}

impl CallKind {
    pub fn from_wire(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => Self::AppendEntries,
            2 => Self::Vote,
            3 => Self::Forward,
            4 => Self::ReadIndex,
            5 => Self::Lease,
            _ => return None,
        })
    }
}

/// The reply frame to request `id`.
pub fn reply_frame(id: u64, result: Result<Vec<u8>, Status>) -> Frame {
    match result {
        Ok(data) => Frame { id, kind: Code::Ok as u32, data },
        Err(s) => Frame { id, kind: s.code() as u32, data: s.message().as_bytes().to_vec() },
    }
}

fn reply_result(f: Frame) -> Result<Vec<u8>, Status> {
    match f.kind {
        0 => Ok(f.data),
        code => Err(Status::new(Code::from_i32(code as i32), String::from_utf8_lossy(&f.data).into_owned())),
    }
}

/// A call's outcome: the reply's bytes or the status it failed with.
type Reply = Result<Vec<u8>, Status>;
type Waiter = oneshot::Sender<Reply>;

/// Calls waiting for their replies on one stream.
#[derive(Default)]
struct Pending {
    next_id: u64,
    waiting: HashMap<u64, Waiter>,
    /// The stream ended: nothing registers any more, the reader failed every waiter.
    closed: bool,
}

struct Session {
    tx: mpsc::UnboundedSender<Frame>,
    pending: Mutex<Pending>,
}

impl Session {
    fn is_closed(&self) -> bool {
        self.pending.lock().expect("poisoned").closed
    }

    /// A fresh id and the receiver of its reply; `None` if the stream has ended.
    fn register(&self) -> Option<(u64, oneshot::Receiver<Reply>)> {
        let mut p = self.pending.lock().expect("poisoned");
        if p.closed {
            return None;
        }
        p.next_id += 1;
        let id = p.next_id;
        let (tx, rx) = oneshot::channel();
        p.waiting.insert(id, tx);
        Some((id, rx))
    }

    fn forget(&self, id: u64) {
        self.pending.lock().expect("poisoned").waiting.remove(&id);
    }

    fn deliver(&self, f: Frame) {
        let waiter = self.pending.lock().expect("poisoned").waiting.remove(&f.id);
        if let Some(w) = waiter {
            let _ = w.send(reply_result(f));
        }
    }

    fn close(&self, why: &str) {
        let waiting = {
            let mut p = self.pending.lock().expect("poisoned");
            p.closed = true;
            std::mem::take(&mut p.waiting)
        };
        for (_, w) in waiting {
            let _ = w.send(Err(Status::unknown(format!("peer stream closed before the reply: {why}"))));
        }
    }
}

struct Registered<'a> {
    session: &'a Session,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.session.forget(self.id);
    }
}

/// The way to one peer: its shared channel for unary calls and the call stream on it.
pub struct PeerLink {
    client: RaftPeerClient<Channel>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The peer does not serve `Calls`: use unary calls only.
    unary_only: AtomicBool,
}

impl PeerLink {
    pub fn new(client: RaftPeerClient<Channel>) -> Self {
        Self { client, session: Default::default(), unary_only: AtomicBool::new(false) }
    }

    /// The unary client on the same channel (snapshots use it).
    pub fn client(&self) -> RaftPeerClient<Channel> {
        self.client.clone()
    }

    /// Call the peer and return the reply's bytes, or the status the peer or transport
    /// gave. `timeout` bounds the whole call.
    pub async fn call(&self, kind: CallKind, data: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, Status> {
        let call = async {
            if data.len() > STREAM_FRAME_MAX || self.unary_only.load(Ordering::Relaxed) {
                return self.unary(kind, data, timeout).await;
            }
            let session = match self.session().await {
                Ok(s) => s,
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!("peer does not serve the call stream: using unary calls");
                    self.unary_only.store(true, Ordering::Relaxed);
                    return self.unary(kind, data, timeout).await;
                }
                Err(s) => return Err(s),
            };
            let Some((id, rx)) = session.register() else {
                return Err(Status::unavailable("peer stream closed"));
            };
            // Unregisters the call however it ends, a timeout included.
            let _registered = Registered { session: &session, id };
            if session.tx.send(Frame { id, kind: kind as u32, data }).is_err() {
                return Err(Status::unavailable("peer stream closed"));
            }
            rx.await.unwrap_or_else(|_| Err(Status::unknown("peer stream dropped the call")))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!("peer call {kind:?} timed out after {timeout:?}"))),
        }
    }

    /// The open stream, or a new one (one round trip to open).
    async fn session(&self) -> Result<Arc<Session>, Status> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut client = self.client.clone();
        let inbound = match client.calls(UnboundedReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            // Whatever failed, no frame was sent.
            Err(s) if s.code() == Code::Unimplemented => return Err(s),
            Err(s) => return Err(Status::unavailable(format!("opening the peer stream: {}", s.message()))),
        };
        let session = Arc::new(Session { tx, pending: Default::default() });
        tokio::spawn(read_replies(inbound, session.clone()));
        *slot = Some(session.clone());
        Ok(session)
    }

    async fn unary(&self, kind: CallKind, data: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, Status> {
        use prost::Message;
        let mut c = self.client.clone();
        macro_rules! blob_call {
            ($m:ident) => {{
                let mut r = tonic::Request::new(Blob { data });
                r.set_timeout(timeout);
                c.$m(r).await.map(|r| r.into_inner().data)
            }};
        }
        match kind {
            CallKind::AppendEntries => blob_call!(append_entries),
            CallKind::Vote => blob_call!(vote),
            CallKind::Forward => blob_call!(forward),
            CallKind::ReadIndex => {
                let mut r = tonic::Request::new(ReadIndexRequest {});
                r.set_timeout(timeout);
                c.read_index(r).await.map(|r| r.into_inner().encode_to_vec())
            }
            CallKind::Lease => {
                let req = LeaseRequest::decode(data.as_slice())
                    .map_err(|e| Status::internal(format!("encoding a lease call: {e}")))?;
                let mut r = tonic::Request::new(req);
                r.set_timeout(timeout);
                c.lease(r).await.map(|r| r.into_inner().encode_to_vec())
            }
        }
    }
}

/// Hand each reply to its caller until the stream ends, then fail the calls still waiting.
async fn read_replies(mut inbound: tonic::Streaming<Frame>, session: Arc<Session>) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(f)) => session.deliver(f),
            Ok(None) => break "the peer ended it".to_string(),
            Err(s) => break s.message().to_string(),
        }
    };
    tracing::debug!("peer call stream closed: {why}");
    session.close(&why);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures::StreamExt;
    use tonic::{Request, Response, Streaming};

    use super::*;
    use crate::proto::peer::raft_peer_server::{RaftPeer, RaftPeerServer};
    use crate::proto::peer::{JoinReply, JoinRequest, LeaseReply, MemberCheckReply, MemberCheckRequest, ReadIndexResponse};

    /// A peer that echoes AppendEntries and counts how each call arrived. `stream`: whether
    /// it serves `Calls`. On the stream, a [`HOLD`] call is never answered and an [`END`]
    /// call ends the reply stream.
    #[derive(Clone, Default)]
    struct Echo {
        stream: bool,
        unary_calls: Arc<AtomicUsize>,
        stream_calls: Arc<AtomicUsize>,
    }

    const HOLD: &[u8] = b"hold";
    const END: &[u8] = b"end";

    #[tonic::async_trait]
    impl RaftPeer for Echo {
        async fn append_entries(&self, r: Request<Blob>) -> Result<Response<Blob>, Status> {
            self.unary_calls.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(r.into_inner()))
        }
        async fn vote(&self, _r: Request<Blob>) -> Result<Response<Blob>, Status> {
            Err(Status::unimplemented("vote"))
        }
        async fn install_snapshot(&self, _r: Request<Blob>) -> Result<Response<Blob>, Status> {
            Err(Status::unimplemented("snapshot"))
        }
        async fn forward(&self, _r: Request<Blob>) -> Result<Response<Blob>, Status> {
            Err(Status::unimplemented("forward"))
        }
        async fn read_index(&self, _r: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
            Err(Status::unimplemented("read index"))
        }
        async fn lease(&self, _r: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
            Err(Status::unimplemented("lease"))
        }
        async fn join(&self, _r: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
            Err(Status::unimplemented("join"))
        }
        async fn member_check(&self, _r: Request<MemberCheckRequest>) -> Result<Response<MemberCheckReply>, Status> {
            Err(Status::unimplemented("member check"))
        }
        async fn precompile(&self, _r: Request<Blob>) -> Result<Response<Blob>, Status> {
            Err(Status::unimplemented("precompile"))
        }
        type CallsStream = UnboundedReceiverStream<Result<Frame, Status>>;
        async fn calls(&self, r: Request<Streaming<Frame>>) -> Result<Response<Self::CallsStream>, Status> {
            if !self.stream {
                return Err(Status::unimplemented("calls"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let mut inbound = r.into_inner();
            let counter = self.stream_calls.clone();
            tokio::spawn(async move {
                while let Some(Ok(f)) = inbound.next().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let reply = match CallKind::from_wire(f.kind) {
                        _ if f.data == HOLD => continue,
                        // End the reply stream, as a stopping server does.
                        _ if f.data == END => break,
                        Some(CallKind::AppendEntries) => Ok(f.data),
                        _ => Err(Status::invalid_argument("only AppendEntries")),
                    };
                    let _ = tx.send(Ok(reply_frame(f.id, reply)));
                }
            });
            Ok(Response::new(UnboundedReceiverStream::new(rx)))
        }
    }

    /// An [`Echo`] peer on a free loopback port (served until the test's runtime ends) and a
    /// link to it.
    async fn start(stream: bool) -> (Echo, Arc<PeerLink>) {
        let echo = Echo { stream, ..Default::default() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder().add_service(RaftPeerServer::new(echo.clone()));
        tokio::spawn(server.serve_with_incoming(incoming));
        (echo, Arc::new(PeerLink::new(crate::raft::network::peer_client(&url).unwrap())))
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn small_calls_travel_on_the_stream_and_large_ones_as_unary_calls() {
        let (echo, link) = start(true).await;
        for i in 0..20u8 {
            assert_eq!(link.call(CallKind::AppendEntries, vec![i; 100], T).await.unwrap(), vec![i; 100]);
        }
        let big = vec![7u8; STREAM_FRAME_MAX + 1];
        assert_eq!(link.call(CallKind::AppendEntries, big.clone(), T).await.unwrap(), big);
        assert_eq!(echo.stream_calls.load(Ordering::SeqCst), 20);
        assert_eq!(echo.unary_calls.load(Ordering::SeqCst), 1);
        // A peer's error comes back with its code and message.
        let err = link.call(CallKind::Vote, vec![1], T).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "only AppendEntries"));
        // A call that gets no reply times out and leaves nothing behind.
        let err = link.call(CallKind::AppendEntries, HOLD.to_vec(), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded);
        let session = link.session.lock().await.clone().unwrap();
        assert!(session.pending.lock().unwrap().waiting.is_empty());
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let (echo, link) = start(false).await;
        for i in 0..3u8 {
            assert_eq!(link.call(CallKind::AppendEntries, vec![i], T).await.unwrap(), vec![i]);
        }
        assert_eq!(echo.unary_calls.load(Ordering::SeqCst), 3);
        assert!(link.unary_only.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_broken_stream_fails_its_calls_as_unknown_and_the_next_call_reopens_it() {
        let (echo, link) = start(true).await;
        assert_eq!(link.call(CallKind::AppendEntries, vec![1], T).await.unwrap(), vec![1]);
        // A call the peer holds, then the peer ends the stream: the caller cannot know
        // whether it acted, so the answer must not be Unavailable.
        let held = tokio::spawn({
            let link = link.clone();
            async move { link.call(CallKind::AppendEntries, HOLD.to_vec(), T).await }
        });
        tokio::time::timeout(T, async {
            while echo.stream_calls.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the held call reaches the peer");
        let err = link.call(CallKind::AppendEntries, END.to_vec(), T).await.unwrap_err();
        assert_eq!(err.code(), Code::Unknown, "{err:?}");
        let err = held.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unknown, "{err:?}");
        // The next call opens a new stream.
        assert_eq!(link.call(CallKind::AppendEntries, vec![2], T).await.unwrap(), vec![2]);
        assert_eq!(echo.stream_calls.load(Ordering::SeqCst), 4);
        assert_eq!(echo.unary_calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn reply_frames_round_trip_status_codes() {
        let ok = reply_result(reply_frame(7, Ok(b"x".to_vec())));
        assert_eq!(ok.unwrap(), b"x");
        let err = reply_result(reply_frame(7, Err(Status::unavailable("not the leader")))).unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "not the leader");
    }

    #[test]
    fn a_closed_session_fails_its_waiters_and_takes_no_more_calls() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let s = Session { tx, pending: Default::default() };
        let (id, mut waiting) = s.register().unwrap();
        let (id2, mut answered) = s.register().unwrap();
        assert_ne!(id, id2);
        s.deliver(reply_frame(id2, Ok(vec![1])));
        s.close("test");
        assert_eq!(answered.try_recv().unwrap().unwrap(), vec![1]);
        assert_eq!(waiting.try_recv().unwrap().unwrap_err().code(), Code::Unknown);
        assert!(s.register().is_none());
    }
}
