//! etcd v3.4 semantics of kv-mvcc, feature by feature, against the in-memory
//! node (store, leases and events with the host's commit rules).

mod common;

use common::*;
use kv_mvcc::command;
use kv_mvcc::error::*;
use kv_mvcc::host::MemNode;
use kv_mvcc::pb::etcdserverpb::compare::{CompareResult as R, TargetUnion as T};
use kv_mvcc::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use kv_mvcc::pb::etcdserverpb::response_op::Response;
use kv_mvcc::pb::etcdserverpb::*;
use kv_mvcc::pb::mvccpb::{event::EventType, KeyValue};

fn rr(key: &str, range_end: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: range_end.into(),
        ..Default::default()
    }
}

/// a b c d e at revisions 2..=6.
fn abcde() -> MemNode {
    let mut n = MemNode::new();
    for (i, k) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        assert_eq!(
            rev_of(&put(&mut n, k, &format!("v{i}")).header),
            2 + i as i64
        );
    }
    n
}

// ------------------------------------------------------------------ revisions

#[test]
fn fresh_store_is_at_revision_1_and_first_put_gets_2() {
    let mut n = MemNode::new();
    assert_eq!(status_rev(&n), 1);
    let r = get(&mut n, "foo");
    assert_eq!(rev_of(&r.header), 1);
    assert_eq!((r.kvs.len(), r.count, r.more), (0, 0, false));

    let p = put(&mut n, "foo", "bar");
    assert_eq!(rev_of(&p.header), 2);
    assert_eq!(p.prev_kv, None);
    assert_eq!(get(&mut n, "foo").kvs, vec![kv("foo", "bar", 2, 2, 1, 0)]);
    assert_eq!(status_rev(&n), 2);
    // The header carries only the revision; the host fills the rest.
    let h = p.header.unwrap();
    assert_eq!((h.cluster_id, h.member_id, h.raft_term), (0, 0, 0));
}

#[test]
fn versions_count_modifications_and_reset_on_delete() {
    let mut n = MemNode::new();
    put(&mut n, "k", "1");
    put(&mut n, "k", "2");
    put(&mut n, "k", "3");
    assert_eq!(get(&mut n, "k").kvs, vec![kv("k", "3", 2, 4, 3, 0)]);

    let d = del(&mut n, "k");
    assert_eq!((d.deleted, rev_of(&d.header)), (1, 5));
    let r = get(&mut n, "k");
    assert_eq!((r.kvs.len(), r.count, rev_of(&r.header)), (0, 0, 5));

    put(&mut n, "k", "again");
    assert_eq!(get(&mut n, "k").kvs, vec![kv("k", "again", 6, 6, 1, 0)]);
}

#[test]
fn deleting_nothing_does_not_bump_the_revision() {
    let mut n = abcde();
    let d = del(&mut n, "zzz");
    assert_eq!((d.deleted, rev_of(&d.header)), (0, 6));
    let d = del_req(
        &mut n,
        DeleteRangeRequest {
            key: "x".into(),
            range_end: "y".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((d.deleted, rev_of(&d.header)), (0, 6));
    assert_eq!(status_rev(&n), 6);
    assert_eq!(n.events.events.len(), 5);
}

// ------------------------------------------------------------------ range

#[test]
fn range_end_forms() {
    let mut n = abcde();
    assert_eq!(keys(&range(&mut n, rr("b", "")).unwrap()), ["b"]);
    assert_eq!(keys(&range(&mut n, rr("b", "d")).unwrap()), ["b", "c"]);
    assert_eq!(
        keys(&range(&mut n, rr("c", "\0")).unwrap()),
        ["c", "d", "e"]
    );
    assert_eq!(
        keys(&range(&mut n, rr("\0", "\0")).unwrap()),
        ["a", "b", "c", "d", "e"]
    );
    // range_end <= key: nothing.
    assert!(range(&mut n, rr("d", "b")).unwrap().kvs.is_empty());
    assert!(range(&mut n, rr("d", "d")).unwrap().kvs.is_empty());
    // Prefix ("b" .. "c") with keys that extend the prefix, and zero bytes.
    put(&mut n, "b/1", "x");
    put(&mut n, "b\0z", "y");
    assert_eq!(
        keys(&range(&mut n, rr("b", "c")).unwrap()),
        ["b", "b\0z", "b/1"]
    );
    assert_eq!(keys(&range(&mut n, rr("b\0", "b\x01")).unwrap()), ["b\0z"]);
}

#[test]
fn range_requires_a_key() {
    let mut n = abcde();
    assert_eq!(range(&mut n, rr("", "\0")).unwrap_err(), EMPTY_KEY);
}

#[test]
fn limit_more_count() {
    let mut n = abcde();
    let r = range(
        &mut n,
        RangeRequest {
            limit: 2,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".to_string(), "b".into()], true, 5)
    );
    let r = range(
        &mut n,
        RangeRequest {
            limit: 5,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));
    let r = range(
        &mut n,
        RangeRequest {
            limit: 4,
            ..rr("b", "\0")
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (4, false, 4));
    // A limit that would overflow the +1 wraps like Go and means "no limit".
    let r = range(
        &mut n,
        RangeRequest {
            limit: i64::MAX,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));
    // Negative limits mean no limit.
    let r = range(
        &mut n,
        RangeRequest {
            limit: -3,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more), (5, false));
}

#[test]
fn count_only_and_keys_only() {
    let mut n = abcde();
    let r = range(
        &mut n,
        RangeRequest {
            count_only: true,
            limit: 1,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(
        (r.kvs.len(), r.count, r.more, rev_of(&r.header)),
        (0, 5, false, 6)
    );
    let r = range(
        &mut n,
        RangeRequest {
            keys_only: true,
            ..rr("b", "d")
        },
    )
    .unwrap();
    assert_eq!(
        r.kvs,
        vec![kv("b", "", 3, 3, 1, 0), kv("c", "", 4, 4, 1, 0)]
    );
    // keys_only also at a past revision.
    let r = range(
        &mut n,
        RangeRequest {
            keys_only: true,
            revision: 3,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(
        r.kvs,
        vec![kv("a", "", 2, 2, 1, 0), kv("b", "", 3, 3, 1, 0)]
    );
}

fn sorted(n: &mut MemNode, order: SortOrder, target: SortTarget, limit: i64) -> Vec<String> {
    let r = range(
        n,
        RangeRequest {
            sort_order: order as i32,
            sort_target: target as i32,
            limit,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    keys(&r)
}

#[test]
fn sorting() {
    let mut n = MemNode::new();
    // key: version, create, mod, value
    put(&mut n, "a", "3"); // a: created 2
    put(&mut n, "b", "1"); // b: created 3
    put(&mut n, "c", "2"); // c: created 4
    put(&mut n, "a", "3"); // a: v2 mod 5
    put(&mut n, "a", "0"); // a: v3 mod 6
    put(&mut n, "b", "1"); // b: v2 mod 7
                           // versions a3 b2 c1; create a2 b3 c4; mod a6 b7 c4; values a"0" b"1" c"2"
    use SortOrder::*;
    use SortTarget::*;
    assert_eq!(sorted(&mut n, Ascend, Key, 0), ["a", "b", "c"]);
    assert_eq!(sorted(&mut n, Descend, Key, 0), ["c", "b", "a"]);
    assert_eq!(sorted(&mut n, Ascend, Version, 0), ["c", "b", "a"]);
    assert_eq!(sorted(&mut n, Descend, Version, 0), ["a", "b", "c"]);
    assert_eq!(sorted(&mut n, Ascend, Create, 0), ["a", "b", "c"]);
    assert_eq!(sorted(&mut n, Descend, Create, 0), ["c", "b", "a"]);
    assert_eq!(sorted(&mut n, Ascend, Mod, 0), ["c", "a", "b"]);
    assert_eq!(sorted(&mut n, Descend, Mod, 0), ["b", "a", "c"]);
    assert_eq!(sorted(&mut n, Ascend, Value, 0), ["a", "b", "c"]);
    assert_eq!(sorted(&mut n, Descend, Value, 1), ["c"]);
    // NONE with a target other than KEY sorts ascending.
    assert_eq!(sorted(&mut n, None, Version, 0), ["c", "b", "a"]);
    assert_eq!(sorted(&mut n, None, Key, 0), ["a", "b", "c"]);
    // With an explicit order, limit applies after sorting...
    assert_eq!(sorted(&mut n, Descend, Mod, 1), ["b"]);
    assert_eq!(sorted(&mut n, Ascend, Version, 2), ["c", "b"]);
    // ...but with NONE etcd fetches limit+1 keys in key order first, then
    // sorts those and truncates: a, b by version -> b, a; limit 1 -> b.
    assert_eq!(sorted(&mut n, None, Version, 1), ["b"]);
    // Ties keep key order, in both directions.
    put(&mut n, "d", "x"); // version 1 like c
    assert_eq!(sorted(&mut n, Ascend, Version, 0), ["c", "d", "b", "a"]);
    assert_eq!(sorted(&mut n, Descend, Version, 0), ["a", "b", "c", "d"]);
    // Sorting by value with keys_only still sorts by the value.
    let r = range(
        &mut n,
        RangeRequest {
            sort_order: Descend as i32,
            sort_target: Value as i32,
            keys_only: true,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(keys(&r), ["d", "c", "b", "a"]);
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
}

#[test]
fn revision_filters_prune_kvs_but_not_count() {
    let mut n = abcde(); // a..e created & modified at 2..6
    put(&mut n, "a", "new"); // a: create 2, mod 7
    let f = |n: &mut MemNode, r: RangeRequest| {
        let r = range(n, RangeRequest { ..r }).unwrap();
        (keys(&r), r.count)
    };
    let all = rr("a", "\0");
    assert_eq!(
        f(
            &mut n,
            RangeRequest {
                min_mod_revision: 5,
                ..all.clone()
            }
        )
        .0,
        ["a", "d", "e"]
    );
    assert_eq!(
        f(
            &mut n,
            RangeRequest {
                max_mod_revision: 4,
                ..all.clone()
            }
        )
        .0,
        ["b", "c"]
    );
    assert_eq!(
        f(
            &mut n,
            RangeRequest {
                min_create_revision: 5,
                ..all.clone()
            }
        )
        .0,
        ["d", "e"]
    );
    assert_eq!(
        f(
            &mut n,
            RangeRequest {
                max_create_revision: 3,
                ..all.clone()
            }
        )
        .0,
        ["a", "b"]
    );
    let (k, count) = f(
        &mut n,
        RangeRequest {
            min_create_revision: 3,
            max_create_revision: 4,
            ..all.clone()
        },
    );
    assert_eq!((k, count), (vec!["b".to_string(), "c".into()], 5));
    // A filter disables the early limit: limit applies to the filtered list.
    let r = range(
        &mut n,
        RangeRequest {
            min_mod_revision: 4,
            limit: 2,
            ..all
        },
    )
    .unwrap();
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".to_string(), "c".into()], true, 5)
    );
}

#[test]
fn reads_at_past_revisions() {
    let mut n = MemNode::new();
    put(&mut n, "a", "1"); // 2
    put(&mut n, "b", "1"); // 3
    put(&mut n, "a", "2"); // 4
    del(&mut n, "b"); // 5
    put(&mut n, "c", "1"); // 6
    put(&mut n, "b", "2"); // 7
    let at = |n: &mut MemNode, rev: i64| {
        let r = range(
            n,
            RangeRequest {
                revision: rev,
                ..rr("a", "\0")
            },
        )
        .unwrap();
        assert_eq!(rev_of(&r.header), 7, "header is the current revision");
        assert_eq!(r.count, r.kvs.len() as i64);
        r.kvs
    };
    assert_eq!(at(&mut n, 1), vec![]);
    assert_eq!(at(&mut n, 2), vec![kv("a", "1", 2, 2, 1, 0)]);
    assert_eq!(
        at(&mut n, 3),
        vec![kv("a", "1", 2, 2, 1, 0), kv("b", "1", 3, 3, 1, 0)]
    );
    assert_eq!(
        at(&mut n, 4),
        vec![kv("a", "2", 2, 4, 2, 0), kv("b", "1", 3, 3, 1, 0)]
    );
    assert_eq!(at(&mut n, 5), vec![kv("a", "2", 2, 4, 2, 0)]);
    assert_eq!(
        at(&mut n, 6),
        vec![kv("a", "2", 2, 4, 2, 0), kv("c", "1", 6, 6, 1, 0)]
    );
    assert_eq!(
        at(&mut n, 7),
        vec![
            kv("a", "2", 2, 4, 2, 0),
            kv("b", "2", 7, 7, 1, 0),
            kv("c", "1", 6, 6, 1, 0)
        ]
    );
    // 0 and negative revisions mean "latest".
    assert_eq!(at(&mut n, 0), at(&mut n, 7));
    assert_eq!(at(&mut n, -4), at(&mut n, 7));
    // Single key, limit and count at a past revision.
    let r = range(
        &mut n,
        RangeRequest {
            revision: 3,
            ..rr("b", "")
        },
    )
    .unwrap();
    assert_eq!(r.kvs, vec![kv("b", "1", 3, 3, 1, 0)]);
    let r = range(
        &mut n,
        RangeRequest {
            revision: 5,
            ..rr("b", "")
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.count), (0, 0));
    let r = range(
        &mut n,
        RangeRequest {
            revision: 6,
            limit: 1,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".to_string()], true, 2)
    );
    let r = range(
        &mut n,
        RangeRequest {
            revision: 4,
            count_only: true,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.count), (0, 2));
    // The future is an error.
    let e = range(
        &mut n,
        RangeRequest {
            revision: 8,
            ..rr("a", "")
        },
    )
    .unwrap_err();
    assert_eq!(e, FUTURE_REV);
}

// ------------------------------------------------------------------ put

#[test]
fn put_prev_kv() {
    let mut n = MemNode::new();
    let p = put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "1".into(),
            prev_kv: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.prev_kv, None);
    let p = put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "2".into(),
            prev_kv: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.prev_kv, Some(kv("k", "1", 2, 2, 1, 0)));
    // Without the flag, no prev_kv.
    assert_eq!(put(&mut n, "k", "3").prev_kv, None);
}

#[test]
fn put_validation_errors() {
    let mut n = MemNode::new();
    let e = |n: &mut MemNode, p: PutRequest| put_req(n, p).unwrap_err();
    assert_eq!(e(&mut n, PutRequest::default()), EMPTY_KEY);
    let p = PutRequest {
        key: "k".into(),
        value: "v".into(),
        ignore_value: true,
        ..Default::default()
    };
    assert_eq!(e(&mut n, p), VALUE_PROVIDED);
    let p = PutRequest {
        key: "k".into(),
        lease: 5,
        ignore_lease: true,
        ..Default::default()
    };
    assert_eq!(e(&mut n, p), LEASE_PROVIDED);
    // ignore_* on a missing key.
    let p = PutRequest {
        key: "k".into(),
        ignore_value: true,
        ..Default::default()
    };
    assert_eq!(e(&mut n, p), KEY_NOT_FOUND);
    let p = PutRequest {
        key: "k".into(),
        value: "v".into(),
        ignore_lease: true,
        ..Default::default()
    };
    assert_eq!(e(&mut n, p), KEY_NOT_FOUND);
    // A lease that is not live.
    let p = PutRequest {
        key: "k".into(),
        value: "v".into(),
        lease: 7,
        ..Default::default()
    };
    assert_eq!(e(&mut n, p), LEASE_NOT_FOUND);
    // etcd checks the lease before the key: both wrong -> lease not found.
    let p = PutRequest {
        key: "k".into(),
        lease: 7,
        ignore_value: true,
        ..Default::default()
    };
    assert_eq!(e(&mut n, p), LEASE_NOT_FOUND);
    // Nothing was written by any of these.
    assert_eq!(status_rev(&n), 1);
    assert!(n.store.map.is_empty());
    assert!(n.events.events.is_empty());
}

#[test]
fn put_ignore_value_and_ignore_lease() {
    let mut n = MemNode::new();
    n.leases.live.extend([10, 20]);
    put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "v1".into(),
            lease: 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(n.leases.keys(10), vec![b"k".to_vec()]);

    // ignore_value keeps the value, takes the new lease.
    let p = PutRequest {
        key: "k".into(),
        lease: 20,
        ignore_value: true,
        prev_kv: true,
        ..Default::default()
    };
    let r = put_req(&mut n, p).unwrap();
    assert_eq!(r.prev_kv, Some(kv("k", "v1", 2, 2, 1, 10)));
    assert_eq!(get(&mut n, "k").kvs, vec![kv("k", "v1", 2, 3, 2, 20)]);
    assert_eq!(
        (n.leases.keys(10), n.leases.keys(20)),
        (vec![], vec![b"k".to_vec()])
    );

    // ignore_lease keeps the lease, takes the new value.
    let p = PutRequest {
        key: "k".into(),
        value: "v2".into(),
        ignore_lease: true,
        ..Default::default()
    };
    put_req(&mut n, p).unwrap();
    assert_eq!(get(&mut n, "k").kvs, vec![kv("k", "v2", 2, 4, 3, 20)]);
    assert_eq!(n.leases.keys(20), vec![b"k".to_vec()]);

    // A plain put drops the lease.
    put(&mut n, "k", "v3");
    assert_eq!(get(&mut n, "k").kvs, vec![kv("k", "v3", 2, 5, 4, 0)]);
    assert!(n.leases.attached.is_empty());
}

#[test]
fn delete_detaches_the_lease() {
    let mut n = MemNode::new();
    n.leases.live.insert(1);
    put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "v".into(),
            lease: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(n.leases.keys(1), vec![b"k".to_vec()]);
    del(&mut n, "k");
    assert!(n.leases.attached.is_empty());
}

// ------------------------------------------------------------------ delete

#[test]
fn delete_range_prev_kvs_and_deleted() {
    let mut n = abcde();
    let d = del_req(
        &mut n,
        DeleteRangeRequest {
            key: "b".into(),
            range_end: "d".into(),
            prev_kv: true,
        },
    )
    .unwrap();
    assert_eq!(d.deleted, 2);
    assert_eq!(rev_of(&d.header), 7);
    assert_eq!(
        d.prev_kvs,
        vec![kv("b", "v1", 3, 3, 1, 0), kv("c", "v2", 4, 4, 1, 0)]
    );
    // Without prev_kv: count only.
    let d = del_req(
        &mut n,
        DeleteRangeRequest {
            key: "d".into(),
            range_end: "\0".into(),
            prev_kv: false,
        },
    )
    .unwrap();
    assert_eq!((d.deleted, d.prev_kvs.len(), rev_of(&d.header)), (2, 0, 8));
    assert_eq!(keys(&range(&mut n, rr("\0", "\0")).unwrap()), ["a"]);
    // One revision for the whole range: both deletes at 7, in key order.
    let evs = events(&n);
    let dels: Vec<_> = evs
        .iter()
        .filter(|(_, e)| e.r#type == EventType::Delete as i32)
        .collect();
    assert_eq!(dels.len(), 4);
    assert_eq!(dels[0].1.kv.as_ref().unwrap().mod_revision, 7);
    assert_eq!(dels[1].1.kv.as_ref().unwrap().mod_revision, 7);
    assert_eq!(dels[2].1.kv.as_ref().unwrap().mod_revision, 8);
    assert_eq!(
        del_req(&mut n, DeleteRangeRequest::default()).unwrap_err(),
        EMPTY_KEY
    );
}

// ------------------------------------------------------------------ events

#[test]
fn events_for_puts_and_deletes() {
    let mut n = MemNode::new();
    put(&mut n, "k", "1");
    put(&mut n, "k", "2");
    del(&mut n, "k");
    let evs = events(&n);
    assert_eq!(evs.len(), 3);
    assert!(evs.iter().all(|(k, _)| k == b"k"));
    assert_eq!(evs[0].1.r#type, EventType::Put as i32);
    assert_eq!(evs[0].1.kv, Some(kv("k", "1", 2, 2, 1, 0)));
    assert_eq!(evs[0].1.prev_kv, None);
    assert_eq!(evs[1].1.kv, Some(kv("k", "2", 2, 3, 2, 0)));
    // Events carry no prev_kv (etcd reads it for the watchers that ask, at
    // mod_revision - 1): applying a put reads no old value.
    assert_eq!(evs[1].1.prev_kv, None);
    assert_eq!(evs[2].1.r#type, EventType::Delete as i32);
    // A delete event's kv has only the key and the delete's revision.
    assert_eq!(
        evs[2].1.kv,
        Some(KeyValue {
            key: "k".into(),
            mod_revision: 4,
            ..Default::default()
        })
    );
    assert_eq!(evs[2].1.prev_kv, None);
    // Reads emit nothing.
    get(&mut n, "k");
    assert_eq!(events(&n).len(), 3);
}

// ------------------------------------------------------------------ txn

#[test]
fn txn_compares_each_target_and_result() {
    let mut n = MemNode::new();
    n.leases.live.insert(9);
    put(&mut n, "k", "m"); // create 2
    put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "m".into(),
            lease: 9,
            ..Default::default()
        },
    )
    .unwrap();
    // k: value "m", create 2, mod 3, version 2, lease 9
    let check = |n: &mut MemNode, c: Compare| -> bool {
        let r = txn(
            n,
            TxnRequest {
                compare: vec![c],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rev_of(&r.header), 3, "a read-only txn keeps the revision");
        r.succeeded
    };
    let cases: Vec<(T, [bool; 4])> = vec![
        // target value, [EQUAL, NOT_EQUAL, GREATER, LESS] when compared with k
        (T::Version(2), [true, false, false, false]),
        (T::Version(1), [false, true, true, false]),
        (T::CreateRevision(3), [false, true, false, true]),
        (T::CreateRevision(2), [true, false, false, false]),
        (T::ModRevision(3), [true, false, false, false]),
        (T::ModRevision(4), [false, true, false, true]),
        (T::Value("m".into()), [true, false, false, false]),
        (T::Value("a".into()), [false, true, true, false]),
        (T::Value("z".into()), [false, true, false, true]),
        (T::Lease(9), [true, false, false, false]),
        (T::Lease(0), [false, true, true, false]),
    ];
    for (target, expect) in cases {
        for (res, want) in [R::Equal, R::NotEqual, R::Greater, R::Less]
            .into_iter()
            .zip(expect)
        {
            assert_eq!(
                check(&mut n, cmp("k", res, target.clone())),
                want,
                "{target:?} {res:?}"
            );
        }
    }
    // A missing key compares as a zero KeyValue...
    assert!(check(&mut n, cmp("missing", R::Equal, T::Version(0))));
    assert!(check(
        &mut n,
        cmp("missing", R::Equal, T::CreateRevision(0))
    ));
    assert!(check(&mut n, cmp("missing", R::Less, T::ModRevision(1))));
    assert!(check(&mut n, cmp("missing", R::Equal, T::Lease(0))));
    // ...except that a VALUE compare on it always fails.
    assert!(!check(&mut n, cmp("missing", R::Equal, T::Value(vec![]))));
    assert!(!check(
        &mut n,
        cmp("missing", R::NotEqual, T::Value("x".into()))
    ));
    // All compares must hold.
    let r = txn(
        &mut n,
        TxnRequest {
            compare: vec![
                cmp("k", R::Equal, T::Version(2)),
                cmp("k", R::Equal, T::Version(3)),
            ],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!r.succeeded);
}

#[test]
fn txn_compare_over_a_range() {
    let mut n = abcde(); // versions all 1
    put(&mut n, "c", "again"); // c version 2
    let ranged = |key: &str, end: &str, res: R, t: T| Compare {
        range_end: end.into(),
        ..cmp(key, res, t)
    };
    let ok = |n: &mut MemNode, c: Compare| {
        txn(
            n,
            TxnRequest {
                compare: vec![c],
                ..Default::default()
            },
        )
        .unwrap()
        .succeeded
    };
    assert!(ok(&mut n, ranged("a", "c", R::Equal, T::Version(1))));
    assert!(!ok(&mut n, ranged("a", "d", R::Equal, T::Version(1))));
    assert!(ok(&mut n, ranged("a", "\0", R::Greater, T::Version(0))));
    assert!(
        ok(&mut n, ranged("x", "z", R::Equal, T::Version(0))),
        "empty range = zero KeyValue"
    );
    assert!(!ok(&mut n, ranged("x", "z", R::Equal, T::Value(vec![]))));
}

#[test]
fn txn_branches_sub_revisions_and_responses() {
    let mut n = abcde(); // rev 6
    let t = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Value("v0".into()))],
        success: vec![
            op_get("a"),
            op_put("a", "A"),
            op_get("a"),
            op_del("b", "d"),
            op_put("z", "Z"),
            op_get("z"),
        ],
        failure: vec![op_put("never", "x")],
    };
    let r = txn(&mut n, t).unwrap();
    assert!(r.succeeded);
    assert_eq!(rev_of(&r.header), 7);
    assert_eq!(r.responses.len(), 6);
    let resp = |i: usize| r.responses[i].response.clone().unwrap();
    // A range before any write sees revision 6, after a write 7.
    let Response::ResponseRange(g0) = resp(0) else {
        panic!()
    };
    assert_eq!(
        (rev_of(&g0.header), g0.kvs.clone()),
        (6, vec![kv("a", "v0", 2, 2, 1, 0)])
    );
    let Response::ResponsePut(p1) = resp(1) else {
        panic!()
    };
    assert_eq!(rev_of(&p1.header), 7);
    let Response::ResponseRange(g2) = resp(2) else {
        panic!()
    };
    assert_eq!(
        (rev_of(&g2.header), g2.kvs.clone()),
        (7, vec![kv("a", "A", 2, 7, 2, 0)])
    );
    let Response::ResponseDeleteRange(d3) = resp(3) else {
        panic!()
    };
    assert_eq!((d3.deleted, rev_of(&d3.header)), (2, 7));
    let Response::ResponseRange(g5) = resp(5) else {
        panic!()
    };
    assert_eq!(g5.kvs, vec![kv("z", "Z", 7, 7, 1, 0)]);
    // Every change shares main revision 7; events in order.
    let evs = events(&n);
    let txn_evs: Vec<_> = evs[5..]
        .iter()
        .map(|(k, e)| (k.clone(), e.r#type, e.kv.as_ref().unwrap().mod_revision))
        .collect();
    assert_eq!(
        txn_evs,
        vec![
            (b"a".to_vec(), EventType::Put as i32, 7),
            (b"b".to_vec(), EventType::Delete as i32, 7),
            (b"c".to_vec(), EventType::Delete as i32, 7),
            (b"z".to_vec(), EventType::Put as i32, 7),
        ]
    );
    // History at 6 is intact.
    let r6 = range(
        &mut n,
        RangeRequest {
            revision: 6,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(keys(&r6), ["a", "b", "c", "d", "e"]);

    // The failure branch.
    let t = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Value("v0".into()))],
        success: vec![op_put("never", "x")],
        failure: vec![op_put("f", "F")],
    };
    let r = txn(&mut n, t).unwrap();
    assert!(!r.succeeded);
    assert_eq!(rev_of(&r.header), 8);
    assert_eq!(get(&mut n, "never").count, 0);
    assert_eq!(get(&mut n, "f").kvs, vec![kv("f", "F", 8, 8, 1, 0)]);
}

#[test]
fn txn_without_changes_keeps_the_revision() {
    let mut n = abcde();
    let r = txn(
        &mut n,
        TxnRequest {
            success: vec![op_get("a"), op_del("zz", "")],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rev_of(&r.header), 6);
    let Some(Response::ResponseDeleteRange(d)) = &r.responses[1].response else {
        panic!()
    };
    assert_eq!((d.deleted, rev_of(&d.header)), (0, 6));
    let r = txn(&mut n, TxnRequest::default()).unwrap();
    assert!(r.succeeded && r.responses.is_empty());
    assert_eq!(rev_of(&r.header), 6);
    assert_eq!(status_rev(&n), 6);
}

#[test]
fn nested_txns() {
    let mut n = abcde();
    // All compares, nested too, see the state before the txn: the outer put of
    // "a" does not change what the inner compare on "a" sees.
    let inner = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Value("v0".into()))],
        success: vec![op_put("inner-ok", "1"), op_get("a")],
        failure: vec![op_put("inner-failed", "1")],
    };
    let inner2 = TxnRequest {
        compare: vec![cmp("b", R::Equal, T::Version(5))],
        success: vec![op_put("inner2-ok", "1")],
        failure: vec![op_put("inner2-failed", "1")],
    };
    let t = TxnRequest {
        success: vec![op_put("a", "changed"), op_txn(inner), op_txn(inner2)],
        ..Default::default()
    };
    let r = txn(&mut n, t).unwrap();
    assert!(r.succeeded);
    assert_eq!(rev_of(&r.header), 7);
    let Some(Response::ResponseTxn(t1)) = &r.responses[1].response else {
        panic!()
    };
    assert!(t1.succeeded);
    // Nested responses carry an empty header.
    assert_eq!(t1.header, Some(ResponseHeader::default()));
    let Some(Response::ResponseRange(g)) = &t1.responses[1].response else {
        panic!()
    };
    assert_eq!(g.kvs[0].value, b"changed");
    let Some(Response::ResponseTxn(t2)) = &r.responses[2].response else {
        panic!()
    };
    assert!(!t2.succeeded);
    assert_eq!(
        keys(&range(&mut n, rr("inner", "inner\x7f")).unwrap()),
        ["inner-ok", "inner2-failed"]
    );
    for k in ["inner-ok", "inner2-failed"] {
        assert_eq!(get(&mut n, k).kvs[0].mod_revision, 7);
    }
}

#[test]
fn txn_op_budget_is_the_hosts() {
    // etcd checks --max-txn-ops in its gRPC layer, before raft; so does
    // raftvm's host. The state machine applies a txn of any width, nested too.
    let mut n = MemNode::new();
    let ops = |count: usize, p: &str| {
        (0..count)
            .map(|i| op_put(&format!("{p}{i:04}"), "v"))
            .collect::<Vec<_>>()
    };
    let r = txn(
        &mut n,
        TxnRequest {
            compare: (0..300)
                .map(|_| cmp("k", R::Equal, T::Version(0)))
                .collect(),
            success: ops(1000, "a"),
            failure: ops(10, "b"),
        },
    )
    .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.responses.len(), 1000);
    let nested = TxnRequest {
        success: (0..200)
            .map(|i| op_get(&format!("g{i}")))
            .chain([op_txn(TxnRequest {
                success: ops(200, "n"),
                ..Default::default()
            })])
            .collect(),
        ..Default::default()
    };
    assert!(txn(&mut n, nested).is_ok());
    assert_eq!(range(&mut n, rr("n", "o")).unwrap().count, 200);
}

#[test]
fn read_only_txn_as_query() {
    use prost::Message;
    let mut n = abcde();
    let t = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Version(1))],
        success: vec![
            op_get("a"),
            op_txn(TxnRequest {
                success: vec![op_get("b")],
                ..Default::default()
            }),
        ],
        failure: vec![op_get("c")],
    };
    let via_query = TxnResponse::decode(
        &command::query(&n.store, &command::encode(command::TAG_TXN, &t)).unwrap()[..],
    )
    .unwrap();
    let rev = n.store.clone();
    let applied = txn(&mut n, t).unwrap();
    assert_eq!(via_query, applied);
    assert!(via_query.succeeded);
    // Answering it wrote nothing (the applied one neither: it only reads).
    assert_eq!(n.store, rev);
    // A txn that writes, even only in a nested branch not taken, is refused.
    let writes = TxnRequest {
        failure: vec![op_txn(TxnRequest {
            success: vec![op_put("x", "1")],
            ..Default::default()
        })],
        ..Default::default()
    };
    let e = command::query(&n.store, &command::encode(command::TAG_TXN, &writes)).unwrap_err();
    assert!(e.to_string().starts_with("raftvm: "), "{e}");
    // Validation errors are etcd's, as when applied.
    let bad = TxnRequest {
        success: vec![op_get("")],
        ..Default::default()
    };
    let e = command::query(&n.store, &command::encode(command::TAG_TXN, &bad)).unwrap_err();
    assert_eq!(e.to_string(), EMPTY_KEY);
}

#[test]
fn txn_request_validation_errors() {
    let mut n = abcde();
    let e = |n: &mut MemNode, t: TxnRequest| txn(n, t).unwrap_err();
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                compare: vec![cmp("", R::Equal, T::Version(0))],
                ..Default::default()
            }
        ),
        EMPTY_KEY
    );
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                success: vec![op_put("", "v")],
                ..Default::default()
            }
        ),
        EMPTY_KEY
    );
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                failure: vec![op_get("")],
                ..Default::default()
            }
        ),
        EMPTY_KEY
    );
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                success: vec![op_del("", "")],
                ..Default::default()
            }
        ),
        EMPTY_KEY
    );
    // An op with nothing in it.
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                success: vec![RequestOp { request: None }],
                ..Default::default()
            }
        ),
        KEY_NOT_FOUND
    );
    // Put checks inside a txn, even in the branch not taken.
    let bad_put = RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: "k".into(),
            value: "v".into(),
            ignore_value: true,
            ..Default::default()
        })),
    };
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                failure: vec![bad_put],
                ..Default::default()
            }
        ),
        VALUE_PROVIDED
    );
    let nested_empty = op_txn(TxnRequest {
        success: vec![op_put("", "")],
        ..Default::default()
    });
    assert_eq!(
        e(
            &mut n,
            TxnRequest {
                success: vec![nested_empty],
                ..Default::default()
            }
        ),
        EMPTY_KEY
    );
    assert_eq!(status_rev(&n), 6);
}

#[test]
fn txn_duplicate_keys() {
    let mut n = abcde();
    let dup = |n: &mut MemNode, success: Vec<RequestOp>| {
        txn(
            n,
            TxnRequest {
                success,
                ..Default::default()
            },
        )
    };
    assert_eq!(
        dup(&mut n, vec![op_put("k", "1"), op_put("k", "2")]).unwrap_err(),
        DUPLICATE_KEY
    );
    assert_eq!(
        dup(&mut n, vec![op_put("k", "1"), op_del("k", "")]).unwrap_err(),
        DUPLICATE_KEY
    );
    assert_eq!(
        dup(&mut n, vec![op_del("a", "z"), op_put("k", "1")]).unwrap_err(),
        DUPLICATE_KEY
    );
    // Outside the deleted interval: fine.
    assert!(dup(&mut n, vec![op_del("a", "k"), op_put("k", "1")]).is_ok());
    // Two deletes may overlap; a get and a put of the same key may not collide.
    assert!(dup(
        &mut n,
        vec![
            op_del("a", "c"),
            op_del("b", "d"),
            op_get("k"),
            op_put("k", "2")
        ]
    )
    .is_ok());
    // Puts in a nested txn against the parent's puts and deletes.
    let nested = |ops: Vec<RequestOp>| {
        op_txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
    };
    assert_eq!(
        dup(
            &mut n,
            vec![op_put("k", "1"), nested(vec![op_put("k", "2")])]
        )
        .unwrap_err(),
        DUPLICATE_KEY
    );
    assert_eq!(
        dup(
            &mut n,
            vec![op_del("k", ""), nested(vec![op_put("k", "2")])]
        )
        .unwrap_err(),
        DUPLICATE_KEY
    );
    // The parent's put against a nested delete.
    assert_eq!(
        dup(
            &mut n,
            vec![nested(vec![op_del("a", "z")]), op_put("k", "1")]
        )
        .unwrap_err(),
        DUPLICATE_KEY
    );
    // Two nested txns putting the same key.
    assert_eq!(
        dup(
            &mut n,
            vec![
                nested(vec![op_put("k", "1")]),
                nested(vec![op_put("k", "2")])
            ]
        )
        .unwrap_err(),
        DUPLICATE_KEY
    );
    // then/else of one nested txn are exclusive: the same key is fine.
    let either = op_txn(TxnRequest {
        compare: vec![cmp("nothing-here", R::Equal, T::Version(0))],
        success: vec![op_put("k", "then")],
        failure: vec![op_put("k", "else")],
    });
    let r = dup(&mut n, vec![either]).unwrap();
    let Some(Response::ResponseTxn(inner)) = &r.responses[0].response else {
        panic!()
    };
    assert!(inner.succeeded);
    assert_eq!(get(&mut n, "k").kvs[0].value, b"then");
    // etcd 3.4 quirk, kept: a "\0" range end (every key >= key) is compared as
    // the literal end "\0", so it overlaps no put.
    let r = dup(&mut n, vec![op_del("a", "\0"), op_put("b", "new")]).unwrap();
    assert_eq!(r.responses.len(), 2);
    assert_eq!(keys(&range(&mut n, rr("\0", "\0")).unwrap()), ["b"]);
    assert_eq!(get(&mut n, "b").kvs[0].version, 1);
    // Duplicates are checked in the failure list too.
    let t = TxnRequest {
        failure: vec![op_put("x", "1"), op_put("x", "2")],
        ..Default::default()
    };
    assert_eq!(txn(&mut n, t).unwrap_err(), DUPLICATE_KEY);
}

#[test]
fn txn_state_checks_apply_to_the_taken_branch_only() {
    let mut n = abcde();
    let with_lease = |lease| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: "l".into(),
            value: "v".into(),
            lease,
            ..Default::default()
        })),
    };
    let ignore_value_missing = RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: "missing".into(),
            ignore_value: true,
            ..Default::default()
        })),
    };
    let get_at = |revision| RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: "a".into(),
            revision,
            ..Default::default()
        })),
    };
    let e = |n: &mut MemNode, ops: Vec<RequestOp>| {
        txn(
            n,
            TxnRequest {
                success: ops,
                ..Default::default()
            },
        )
    };
    assert_eq!(
        e(&mut n, vec![op_put("x", "1"), with_lease(44)]).unwrap_err(),
        LEASE_NOT_FOUND
    );
    assert_eq!(
        e(&mut n, vec![ignore_value_missing.clone()]).unwrap_err(),
        KEY_NOT_FOUND
    );
    assert_eq!(
        e(&mut n, vec![op_put("x", "1"), get_at(7)]).unwrap_err(),
        FUTURE_REV
    );
    // Nested, taken branch.
    let nested = op_txn(TxnRequest {
        success: vec![with_lease(44)],
        ..Default::default()
    });
    assert_eq!(e(&mut n, vec![nested]).unwrap_err(), LEASE_NOT_FOUND);
    // Not taken: no error.
    let t = TxnRequest {
        compare: vec![cmp("a", R::Equal, T::Version(1))],
        success: vec![op_put("ok", "1")],
        failure: vec![with_lease(44), ignore_value_missing, get_at(99)],
    };
    assert!(txn(&mut n, t).unwrap().succeeded);
    // The failed txns left no trace.
    assert_eq!(get(&mut n, "x").count, 0);
    assert_eq!(status_rev(&n), 7);
    assert_eq!(events(&n).len(), 6);
    // A compacted revision in a txn range.
    compact(&mut n, 5).unwrap();
    assert_eq!(e(&mut n, vec![get_at(4)]).unwrap_err(), COMPACTED);
    // etcd quirk: a negative revision below the compacted one is "compacted" in a txn.
    assert_eq!(e(&mut n, vec![get_at(-3)]).unwrap_err(), COMPACTED);
    let r = e(&mut n, vec![get_at(5)]).unwrap();
    let Some(Response::ResponseRange(g)) = &r.responses[0].response else {
        panic!()
    };
    assert_eq!(g.kvs, vec![kv("a", "v0", 2, 2, 1, 0)]);
}

#[test]
fn txn_put_with_live_lease_attaches() {
    let mut n = MemNode::new();
    n.leases.live.insert(3);
    let op = RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: "l".into(),
            value: "v".into(),
            lease: 3,
            ..Default::default()
        })),
    };
    txn(
        &mut n,
        TxnRequest {
            success: vec![op],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(n.leases.keys(3), vec![b"l".to_vec()]);
    assert_eq!(get(&mut n, "l").kvs[0].lease, 3);
}

// ------------------------------------------------------------------ compaction

#[test]
fn compaction() {
    let mut n = MemNode::new();
    put(&mut n, "a", "1"); // 2
    put(&mut n, "b", "1"); // 3
    put(&mut n, "a", "2"); // 4
    del(&mut n, "b"); // 5
    put(&mut n, "c", "1"); // 6
    put(&mut n, "a", "3"); // 7
    let at = |n: &mut MemNode, rev: i64| {
        range(
            n,
            RangeRequest {
                revision: rev,
                ..rr("a", "\0")
            },
        )
    };
    let before: Vec<_> = (4..=7).map(|r| at(&mut n, r).unwrap()).collect();
    let records_before = n.store.map.len();

    assert_eq!(compact(&mut n, 8).unwrap_err(), FUTURE_REV);
    let c = compact(&mut n, 5).unwrap();
    assert_eq!(rev_of(&c.header), 7);
    assert_eq!(status_rev(&n), 7, "compaction does not bump the revision");
    assert!(n.store.map.len() < records_before);
    // Reads at or above the compacted revision are unchanged.
    for (i, r) in (5..=7).enumerate() {
        assert_eq!(at(&mut n, r).unwrap(), before[i + 1], "rev {r}");
    }
    assert_eq!(at(&mut n, 4).unwrap_err(), COMPACTED);
    assert_eq!(at(&mut n, 1).unwrap_err(), COMPACTED);
    // Again at or below: compacted.
    assert_eq!(compact(&mut n, 5).unwrap_err(), COMPACTED);
    assert_eq!(compact(&mut n, 3).unwrap_err(), COMPACTED);
    // Further compaction, to the current revision.
    compact(&mut n, 7).unwrap();
    assert_eq!(at(&mut n, 7).unwrap(), before[3]);
    assert_eq!(at(&mut n, 6).unwrap_err(), COMPACTED);
    // Only the latest version of each live key remains: 2 keys x (k/, h/)
    // records, the r/ record of a's put at 7 (c's at 6 is below the compacted
    // revision, where nothing reads r/), m/rev and m/compact.
    assert_eq!(n.store.map.len(), 2 * 2 + 1 + 2);
    // Writing on continues normally.
    put(&mut n, "a", "4");
    assert_eq!(get(&mut n, "a").kvs, vec![kv("a", "4", 2, 8, 4, 0)]);
    assert_eq!(at(&mut n, 7).unwrap().kvs, before[3].kvs);
}

#[test]
fn compaction_of_a_fresh_store() {
    let mut n = MemNode::new();
    assert_eq!(compact(&mut n, 2).unwrap_err(), FUTURE_REV);
    // etcd starts with compacted revision -1, so compacting at 0 or 1 works once.
    assert_eq!(rev_of(&compact(&mut n, 1).unwrap().header), 1);
    assert_eq!(compact(&mut n, 1).unwrap_err(), COMPACTED);
    assert_eq!(compact(&mut n, 0).unwrap_err(), COMPACTED);
    put(&mut n, "a", "1");
    assert_eq!(get(&mut n, "a").kvs, vec![kv("a", "1", 2, 2, 1, 0)]);
}

/// A compaction removes its history in bounded steps: one revision that
/// deleted 300 keys, and one key with 300 versions, each take several steps,
/// and reads answer the same before, between and after them.
#[test]
fn compaction_runs_in_bounded_steps() {
    let mut n = MemNode::new();
    for i in 0..300 {
        put(&mut n, &format!("k{i:03}"), "v"); // 2..=301
    }
    let gone = del_req(
        &mut n,
        DeleteRangeRequest {
            key: "k".into(),
            range_end: "l".into(),
            ..Default::default()
        },
    )
    .unwrap(); // 302
    assert_eq!((gone.deleted, rev_of(&gone.header)), (300, 302));
    for i in 0..300 {
        put(&mut n, "hot", &i.to_string()); // 303..=602
    }
    put(&mut n, "last", "1"); // 603
    let reads = |n: &mut MemNode| {
        let all = |rev| RangeRequest {
            revision: rev,
            ..rr("\0", "\0")
        };
        let at = [602, 603].map(|r| range(n, all(r)).unwrap());
        (at, hash_kv(n, 0).unwrap(), hash_kv(n, 603).unwrap())
    };

    let pending = |n: &MemNode| n.query(&[command::TAG_COMPACT_PENDING]).unwrap();
    assert_eq!(pending(&n), [0]);
    compact_only(&mut n, 602).unwrap();
    assert_eq!(pending(&n), [1]);
    let before = reads(&mut n);
    assert_eq!(before.0[0].count, 1, "only hot is live at 602");
    let records = n.store.map.len();
    let mut steps = 0;
    while compact_step(&mut n, Some(50)) {
        steps += 1;
        assert_eq!(reads(&mut n), before, "after step {steps}");
    }
    // 300 keys' two records, 300 versions of one key, 50 units a step.
    assert!(steps >= 12, "{steps} steps");
    assert_eq!(reads(&mut n), before);
    // Left: hot's and last's k/, h/, r/ records, m/rev and m/compact.
    assert_eq!(n.store.map.len(), 2 * 3 + 2, "from {records} records");
    assert!(!compact_step(&mut n, Some(50)), "nothing left to do");
    assert_eq!(pending(&n), [0]);
}

#[test]
fn compaction_keeps_a_key_written_once_long_ago() {
    let mut n = MemNode::new();
    put(&mut n, "old", "v"); // 2
    for i in 0..5 {
        put(&mut n, "hot", &i.to_string()); // 3..7
    }
    compact(&mut n, 4).unwrap();
    compact(&mut n, 6).unwrap();
    let r = range(
        &mut n,
        RangeRequest {
            revision: 6,
            ..rr("a", "\0")
        },
    )
    .unwrap();
    assert_eq!(
        r.kvs,
        vec![kv("hot", "3", 3, 6, 4, 0), kv("old", "v", 2, 2, 1, 0)]
    );
}

// ------------------------------------------------------------------ leases

#[test]
fn lease_revocation_deletes_at_one_revision() {
    let mut n = MemNode::new();
    n.leases.live.extend([1, 2]);
    for (k, lease) in [("x", 1), ("y", 1), ("z", 2), ("w", 1)] {
        put_req(
            &mut n,
            PutRequest {
                key: k.into(),
                value: "v".into(),
                lease,
                ..Default::default()
            },
        )
        .unwrap();
    }
    // rev 5. "w" moves to lease 2 but the registry could still list it: the
    // guest only deletes keys that still carry the revoked lease.
    put_req(
        &mut n,
        PutRequest {
            key: "w".into(),
            value: "v".into(),
            lease: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let before = events(&n).len();
    kv_mvcc::command::lease_revoked(
        &mut n.store,
        &mut n.leases,
        &mut n.events,
        1,
        &[
            b"y".to_vec(),
            b"x".to_vec(),
            b"w".to_vec(),
            b"gone".to_vec(),
            b"x".to_vec(),
        ],
    )
    .unwrap();
    assert_eq!(status_rev(&n), 7);
    assert_eq!(keys(&range(&mut n, rr("\0", "\0")).unwrap()), ["w", "z"]);
    let evs = events(&n);
    let new: Vec<_> = evs[before..]
        .iter()
        .map(|(k, e)| (k.clone(), e.r#type, e.kv.as_ref().unwrap().mod_revision))
        .collect();
    assert_eq!(
        new,
        vec![
            (b"x".to_vec(), EventType::Delete as i32, 7),
            (b"y".to_vec(), EventType::Delete as i32, 7)
        ]
    );
    // MemNode::revoke drives the same path with the registry's keys.
    n.revoke(2).unwrap();
    assert_eq!(status_rev(&n), 8);
    assert!(range(&mut n, rr("\0", "\0")).unwrap().kvs.is_empty());
    assert!(!n.leases.live.contains(&2));
    let e = put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "v".into(),
            lease: 2,
            ..Default::default()
        },
    );
    assert_eq!(e.unwrap_err(), LEASE_NOT_FOUND);
    // Revoking a lease with no keys changes nothing.
    n.leases.live.insert(3);
    n.revoke(3).unwrap();
    assert_eq!(status_rev(&n), 8);
}

// ------------------------------------------------------------------ hash, status, encoding

#[test]
fn hash_kv_query() {
    let mut n = MemNode::new();
    let h1 = hash_kv(&n, 0).unwrap();
    assert_eq!((rev_of(&h1.header), h1.compact_revision), (1, -1));
    put(&mut n, "a", "1");
    put(&mut n, "b", "1");
    let h3 = hash_kv(&n, 3).unwrap();
    assert_ne!(h3.hash, h1.hash);
    assert_eq!(hash_kv(&n, 0).unwrap().hash, h3.hash);
    let h2 = hash_kv(&n, 2).unwrap();
    assert_ne!(h2.hash, h3.hash);
    // Later writes do not change the hash at an earlier revision.
    put(&mut n, "a", "2");
    assert_eq!(hash_kv(&n, 3).unwrap().hash, h3.hash);
    assert_eq!(rev_of(&hash_kv(&n, 3).unwrap().header), 4);
    // Another node with the same history has the same hashes; a different
    // value gives a different one.
    let mut m = MemNode::new();
    put(&mut m, "a", "1");
    put(&mut m, "b", "1");
    put(&mut m, "a", "2");
    assert_eq!(hash_kv(&m, 0).unwrap(), hash_kv(&n, 0).unwrap());
    let mut o = MemNode::new();
    put(&mut o, "a", "1");
    put(&mut o, "b", "1");
    put(&mut o, "a", "X");
    assert_ne!(hash_kv(&o, 0).unwrap().hash, hash_kv(&n, 0).unwrap().hash);
    // Errors.
    assert_eq!(hash_kv(&n, 5).unwrap_err(), FUTURE_REV);
    compact(&mut n, 3).unwrap();
    assert_eq!(hash_kv(&n, 3).unwrap_err(), COMPACTED);
    assert_eq!(hash_kv(&n, 0).unwrap().compact_revision, 3);
}

#[test]
fn query_accepts_only_reads() {
    let mut n = abcde();
    let put_cmd = command::encode(
        command::TAG_PUT,
        &PutRequest {
            key: "k".into(),
            ..Default::default()
        },
    );
    assert!(n.query(&put_cmd).unwrap_err().starts_with("raftvm: "));
    // (A read-only txn is a query: tests read_only_txn_as_query.)
    for tag in [
        command::TAG_DELETE_RANGE,
        command::TAG_COMPACTION,
        command::TAG_COMPACT_STEP,
        0,
        11,
        255,
    ] {
        assert!(
            n.query(&[tag]).unwrap_err().starts_with("raftvm: "),
            "tag {tag}"
        );
    }
    for tag in [
        command::TAG_HASH_KV,
        command::TAG_STATUS,
        command::TAG_WATCH_HISTORY,
        0,
        10,
        255,
    ] {
        assert!(
            n.apply(&[tag]).unwrap_err().starts_with("raftvm: "),
            "tag {tag}"
        );
    }
    let e = n.apply(&[command::TAG_COMPACT_STEP, 1, 2]).unwrap_err();
    assert!(e.starts_with("raftvm: malformed compaction step"), "{e}");
    let e = n.query(&[command::TAG_COMPACT_PENDING, 0]).unwrap_err();
    assert!(e.starts_with("raftvm: malformed compaction-pending"), "{e}");
    assert_eq!(n.apply(&[]).unwrap_err(), "raftvm: empty command");
    assert_eq!(n.query(&[]).unwrap_err(), "raftvm: empty command");
    let e = n.apply(&[command::TAG_PUT, 0xFF, 0xFF]).unwrap_err();
    assert!(e.starts_with("raftvm: malformed PutRequest"), "{e}");
    // A tag byte with an empty body is a default request: an empty-key error.
    assert_eq!(n.apply(&[command::TAG_PUT]).unwrap_err(), EMPTY_KEY);
    assert_eq!(status_rev(&n), 6);
    // Query reads see the same as apply reads (checked by common::range).
    assert_eq!(keys(&range(&mut n, rr("a", "c")).unwrap()), ["a", "b"]);
}

#[test]
fn error_messages_are_etcds() {
    // The exact strings etcd 3.4 sends; the host maps them to gRPC codes.
    assert_eq!(
        kv_mvcc::Error::EmptyKey.to_string(),
        "etcdserver: key is not provided"
    );
    assert_eq!(
        kv_mvcc::Error::KeyNotFound.to_string(),
        "etcdserver: key not found"
    );
    assert_eq!(
        kv_mvcc::Error::ValueProvided.to_string(),
        "etcdserver: value is provided"
    );
    assert_eq!(
        kv_mvcc::Error::LeaseProvided.to_string(),
        "etcdserver: lease is provided"
    );
    assert_eq!(
        kv_mvcc::Error::DuplicateKey.to_string(),
        "etcdserver: duplicate key given in txn request"
    );
    assert_eq!(
        kv_mvcc::Error::Compacted.to_string(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        kv_mvcc::Error::FutureRev.to_string(),
        "etcdserver: mvcc: required revision is a future revision"
    );
    assert_eq!(
        kv_mvcc::Error::LeaseNotFound.to_string(),
        "etcdserver: requested lease not found"
    );
}

#[test]
fn failed_commands_leave_no_trace() {
    let mut n = abcde();
    n.leases.live.insert(1);
    let snapshot = (n.store.clone(), n.leases.clone(), n.events.clone());
    // etcd 3.4 accepts this txn (the "\0" delete overlaps no put) and then
    // finds "a" gone when the put wants its value; etcd panics there, kv-mvcc
    // returns the error and the host discards the half-done writes.
    let ignore_value = RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: "a".into(),
            ignore_value: true,
            lease: 1,
            ..Default::default()
        })),
    };
    let e = txn(
        &mut n,
        TxnRequest {
            success: vec![op_del("a", "\0"), ignore_value],
            ..Default::default()
        },
    );
    assert_eq!(e.unwrap_err(), KEY_NOT_FOUND);
    assert_eq!(
        (n.store.clone(), n.leases.clone(), n.events.clone()),
        snapshot
    );
}

// ------------------------------------------------------------------ store layout

#[test]
fn store_layout_records() {
    use kv_mvcc::layout::{self, IndexEntry, Rev};
    use prost::Message;
    let mut n = MemNode::new();
    n.leases.live.insert(4);
    put_req(
        &mut n,
        PutRequest {
            key: "a\0b".into(),
            value: "v".into(),
            lease: 4,
            ..Default::default()
        },
    )
    .unwrap();
    del(&mut n, "a\0b");
    let key = b"a\0b".as_slice();
    let m = &n.store.map;
    let mut want = vec![
        layout::META_REV.to_vec(),
        layout::hist_key(key, Rev::new(2, 0)),
        layout::hist_key(key, Rev::new(3, 0)),
        layout::rev_key(Rev::new(2, 0)),
        layout::rev_key(Rev::new(3, 0)),
    ];
    want.sort();
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        want,
        "the index record is gone after the delete"
    );
    assert_eq!(m[layout::META_REV], 3i64.to_be_bytes());
    // The put's history record is the KeyValue without its key; the delete's
    // is the one-byte tombstone; r/ points back at the key.
    let rec = KeyValue::decode(m[&layout::hist_key(key, Rev::new(2, 0))].as_slice()).unwrap();
    assert_eq!(
        rec,
        KeyValue {
            key: vec![],
            ..kv("", "v", 2, 2, 1, 4)
        }
    );
    assert_eq!(m[&layout::hist_key(key, Rev::new(3, 0))], vec![0u8]);
    assert_eq!(m[&layout::rev_key(Rev::new(3, 0))], key);
    // A live key has its 40-byte index record.
    put(&mut n, "z", "1");
    let ie = IndexEntry::decode(&n.store.map[&layout::index_key(b"z")]).unwrap();
    assert_eq!(
        ie,
        IndexEntry {
            modified: Rev::new(4, 0),
            create_revision: 4,
            version: 1,
            lease: 0
        }
    );
}
