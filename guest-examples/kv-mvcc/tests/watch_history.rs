//! Query tag 8, watch history: the events of past revisions as the apply
//! path emitted them, against the in-memory node.

mod common;

use common::*;
use kv_mvcc::command;
use kv_mvcc::host::MemNode;
use kv_mvcc::mvcc::{WATCH_HISTORY_BYTES, WATCH_HISTORY_EVENTS, WATCH_HISTORY_ROWS};
use kv_mvcc::pb::etcdserverpb::*;
use kv_mvcc::pb::mvccpb::{event::EventType, Event, KeyValue};

fn watch_req(key: &str, range_end: &str, start_revision: i64, prev_kv: bool) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        range_end: range_end.into(),
        start_revision,
        prev_kv,
        ..Default::default()
    }
}

fn watch(n: &MemNode, r: &WatchCreateRequest) -> WatchResponse {
    query(n, command::TAG_WATCH_HISTORY, r).unwrap()
}

/// The whole history from `r.start_revision`, asked for as the host does:
/// again from `header.revision + 1` until the current revision. Checks that
/// no answer ends inside a revision.
fn history(n: &MemNode, r: &WatchCreateRequest) -> Vec<Event> {
    let cur = status_rev(n);
    let mut all = Vec::new();
    let mut r = r.clone();
    loop {
        let w = watch(n, &r);
        assert_eq!(w.compact_revision, 0);
        let covered = rev_of(&w.header);
        assert!(covered <= cur);
        if covered < cur && w.events.len() >= WATCH_HISTORY_EVENTS {
            // Cut short by the event cap: it ends with the revision that reached it.
            assert_eq!(mod_rev(w.events.last().unwrap()), covered);
        }
        assert!(covered >= r.start_revision.min(cur), "no progress from {}", r.start_revision);
        all.extend(w.events);
        if covered == cur {
            return all;
        }
        r.start_revision = covered + 1;
    }
}

fn mod_rev(e: &Event) -> i64 {
    e.kv.as_ref().unwrap().mod_revision
}

fn put_ev(kv: KeyValue, prev_kv: Option<KeyValue>) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(kv),
        prev_kv,
    }
}

fn del_ev(key: &str, rev: i64, prev_kv: Option<KeyValue>) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key: key.into(),
            mod_revision: rev,
            ..Default::default()
        }),
        prev_kv,
    }
}

type Summary = (String, i64, i32);

/// (key, mod_revision, type) of each event.
fn summary(evs: &[Event]) -> Vec<Summary> {
    evs.iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                String::from_utf8(kv.key.clone()).unwrap(),
                kv.mod_revision,
                e.r#type,
            )
        })
        .collect()
}

fn s(key: &str, rev: i64, r#type: i32) -> Summary {
    (key.into(), rev, r#type)
}

const P: i32 = EventType::Put as i32;
const D: i32 = EventType::Delete as i32;

/// A deterministic pseudo-random history over a few keys: puts, single and
/// range deletes, multi-key txns, a lease revocation.
fn random_history(seed: u64, steps: usize) -> MemNode {
    let mut x = seed;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let keys = ["a", "ab", "b", "b\0", "c"];
    let mut n = MemNode::new();
    n.leases.live.insert(1);
    for i in 0..steps {
        let k = keys[next(keys.len() as u64) as usize];
        let value = format!("v{i}");
        match next(10) {
            0..=3 => {
                put(&mut n, k, &value);
            }
            4 => {
                put_req(
                    &mut n,
                    PutRequest {
                        key: k.into(),
                        value: value.into(),
                        lease: 1,
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            5 => {
                del(&mut n, k);
            }
            6 => {
                let end = ["b", "c", "\0", "d"][next(4) as usize];
                del_req(
                    &mut n,
                    DeleteRangeRequest {
                        key: k.into(),
                        range_end: end.into(),
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            _ => {
                // Two puts and a delete of three distinct keys, in a random
                // order: sub-revision order is the txn's op order.
                let a = next(5) as usize;
                let b = (a + 1 + next(4) as usize) % 5;
                let c = (0..5).find(|&c| c != a && c != b).unwrap();
                let mut ops = vec![
                    op_put(keys[a], &value),
                    op_put(keys[b], &value),
                    op_del(keys[c], ""),
                ];
                ops.rotate_left(next(3) as usize);
                txn(
                    &mut n,
                    TxnRequest {
                        success: ops,
                        ..Default::default()
                    },
                )
                .unwrap();
            }
        }
        if i == steps / 2 {
            n.revoke(1).unwrap();
            n.leases.live.insert(1);
        }
    }
    n
}

#[test]
fn history_is_the_events_apply_emitted() {
    for seed in [1, 7, 42, 1234567] {
        let n = random_history(seed, 60);
        let emitted = events(&n);
        let cur = status_rev(&n);
        assert!(emitted.iter().any(|(_, e)| e.r#type == D));
        for (key, end) in [
            ("a", ""),
            ("b\0", ""),
            ("a", "b"),
            ("ab", "c"),
            ("b", "\0"),
            ("", "\0"),
            ("c", "a"),
        ] {
            for start in -1..=cur + 1 {
                let from = if start <= 0 { cur + 1 } else { start };
                let want: Vec<Event> = emitted
                    .iter()
                    .filter(|(k, e)| {
                        // A watch reads an empty key as "\0".
                        let key = if key.is_empty() { "\0" } else { key };
                        mod_rev(e) >= from && in_range(k, key.as_bytes(), end.as_bytes())
                    })
                    .map(|(_, e)| e.clone())
                    .collect();
                assert_eq!(
                    history(&n, &watch_req(key, end, start, false)),
                    want,
                    "seed {seed}, [{key:?}, {end:?}) from {start}"
                );
                // prev_kv: the key's latest emitted event of an earlier
                // revision, if that was a put.
                let with_prev: Vec<Event> = want
                    .iter()
                    .map(|e| {
                        let kv = e.kv.as_ref().unwrap();
                        let prev_kv = emitted
                            .iter()
                            .rev()
                            .find(|(k, p)| *k == kv.key && mod_rev(p) < kv.mod_revision)
                            .filter(|(_, p)| p.r#type == P)
                            .and_then(|(_, p)| p.kv.clone());
                        Event {
                            prev_kv,
                            ..e.clone()
                        }
                    })
                    .collect();
                assert_eq!(
                    history(&n, &watch_req(key, end, start, true)),
                    with_prev,
                    "seed {seed}, [{key:?}, {end:?}) from {start} with prev_kv"
                );
            }
        }
    }
}

#[test]
fn key_prefix_and_range_filtering() {
    let mut n = MemNode::new();
    put(&mut n, "foo", "1"); // 2
    put(&mut n, "foo1", "1"); // 3
    put(&mut n, "fop", "1"); // 4
    put(&mut n, "bar", "1"); // 5
    del(&mut n, "foo"); // 6
    put(&mut n, "foo\0", "1"); // 7
    let got = |key: &str, end: &str| {
        let w = watch(&n, &watch_req(key, end, 2, false));
        assert_eq!(rev_of(&w.header), 7);
        summary(&w.events)
    };
    // Single key: not its extensions.
    assert_eq!(got("foo", ""), [s("foo", 2, P), s("foo", 6, D)]);
    // Prefix "foo" is [foo, fop).
    assert_eq!(
        got("foo", "fop"),
        [
            s("foo", 2, P),
            s("foo1", 3, P),
            s("foo", 6, D),
            s("foo\0", 7, P)
        ]
    );
    // "\0": every key >= key.
    assert_eq!(got("foo1", "\0"), [s("foo1", 3, P), s("fop", 4, P)]);
    // An empty key is "\0": with range end "\0", every key.
    assert_eq!(got("", "\0").len(), 6);
    // ... and alone, the single key "\0".
    assert_eq!(got("", ""), Vec::<Summary>::new());
    // An empty range.
    assert_eq!(got("fop", "foo"), Vec::<Summary>::new());
    assert_eq!(got("b", "b"), Vec::<Summary>::new());
    put(&mut n, "\0", "x"); // 8
    let w = watch(&n, &watch_req("", "", 1, false));
    assert_eq!(summary(&w.events), [s("\0", 8, P)]);
}

#[test]
fn events_are_built_as_apply_builds_them() {
    let mut n = MemNode::new();
    n.leases.live.insert(5);
    put_req(
        &mut n,
        PutRequest {
            key: "k".into(),
            value: "1".into(),
            lease: 5,
            ..Default::default()
        },
    )
    .unwrap(); // 2
    put(&mut n, "k", "2"); // 3
    del(&mut n, "k"); // 4
    let w = watch(&n, &watch_req("k", "", 1, false));
    assert_eq!(
        w.events,
        [
            put_ev(
                KeyValue {
                    lease: 5,
                    ..kv("k", "1", 2, 2, 1, 0)
                },
                None
            ),
            put_ev(kv("k", "2", 2, 3, 2, 0), None),
            del_ev("k", 4, None),
        ]
    );
    // Only header.revision is set; the host fills the rest.
    assert_eq!(
        w.header,
        Some(ResponseHeader {
            revision: 4,
            ..Default::default()
        })
    );
    assert_eq!(
        (w.watch_id, w.created, w.canceled, w.compact_revision),
        (0, false, false, 0)
    );
}

#[test]
fn txn_events_in_sub_revision_order() {
    let mut n = MemNode::new();
    put(&mut n, "m", "0"); // 2
    txn(
        &mut n,
        TxnRequest {
            success: vec![op_put("z", "1"), op_del("m", ""), op_put("a", "1")],
            ..Default::default()
        },
    )
    .unwrap(); // 3
    let w = watch(&n, &watch_req("", "\0", 3, false));
    assert_eq!(
        summary(&w.events),
        [s("z", 3, P), s("m", 3, D), s("a", 3, P)]
    );
    assert_eq!(
        w.events,
        events(&n)[1..]
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn prev_kv_is_the_key_before_the_events_revision() {
    let mut n = MemNode::new();
    put(&mut n, "a", "1"); // 2
    put(&mut n, "a", "2"); // 3
    del(&mut n, "a"); // 4
    put(&mut n, "a", "3"); // 5
                           // etcd 3.4 lets a txn delete [a, "\0") and put "a": both events' prev_kv
                           // is "a" before the txn (etcd reads it at mod_revision - 1).
    txn(
        &mut n,
        TxnRequest {
            success: vec![op_del("a", "\0"), op_put("a", "4")],
            ..Default::default()
        },
    )
    .unwrap(); // 6
    let w = watch(&n, &watch_req("a", "", 2, true));
    let v3 = kv("a", "3", 5, 5, 1, 0);
    assert_eq!(
        w.events,
        [
            put_ev(kv("a", "1", 2, 2, 1, 0), None),
            put_ev(kv("a", "2", 2, 3, 2, 0), Some(kv("a", "1", 2, 2, 1, 0))),
            del_ev("a", 4, Some(kv("a", "2", 2, 3, 2, 0))),
            // After a delete: none.
            put_ev(v3.clone(), None),
            del_ev("a", 6, Some(v3.clone())),
            put_ev(kv("a", "4", 6, 6, 1, 0), Some(v3)),
        ]
    );
    // Without prev_kv, none.
    assert!(watch(&n, &watch_req("a", "", 2, false))
        .events
        .iter()
        .all(|e| e.prev_kv.is_none()));
}

#[test]
fn prev_kv_after_compaction() {
    let mut n = MemNode::new();
    put(&mut n, "kept", "1"); // 2
    put(&mut n, "gone", "1"); // 3
    del(&mut n, "gone"); // 4
    put(&mut n, "kept", "2"); // 5
    put(&mut n, "x", "1"); // 6
    compact(&mut n, 6).unwrap();
    put(&mut n, "kept", "3"); // 7
    put(&mut n, "gone", "2"); // 8
    del(&mut n, "kept"); // 9
    let w = watch(&n, &watch_req("", "\0", 7, true));
    assert_eq!(
        w.events,
        [
            // The version compaction kept (the newest at or below 6).
            put_ev(kv("kept", "3", 2, 7, 3, 0), Some(kv("kept", "2", 2, 5, 2, 0))),
            // Compaction removed "gone"'s put and its tombstone: none.
            put_ev(kv("gone", "2", 8, 8, 1, 0), None),
            del_ev("kept", 9, Some(kv("kept", "3", 2, 7, 3, 0))),
        ]
    );
    assert_eq!(rev_of(&w.header), 9);
}

#[test]
fn a_compacted_start_answers_the_compact_revision() {
    let mut n = MemNode::new();
    for i in 0..5 {
        put(&mut n, "k", &i.to_string()); // 2..=6
    }
    // Never compacted: history from revision 1 on.
    assert_eq!(watch(&n, &watch_req("k", "", 1, false)).events.len(), 5);
    compact(&mut n, 4).unwrap();
    for start in [1, 3] {
        let w = watch(&n, &watch_req("k", "", start, true));
        assert_eq!(
            (w.compact_revision, w.events, rev_of(&w.header)),
            (4, vec![], 6),
            "start {start}"
        );
    }
    // From the compacted revision itself, as etcd: what compaction kept of it
    // (the put at 4, without prev_kv: revision 3 is gone).
    let w = watch(&n, &watch_req("k", "", 4, true));
    assert_eq!(w.compact_revision, 0);
    assert_eq!(summary(&w.events), [s("k", 4, P), s("k", 5, P), s("k", 6, P)]);
    assert_eq!(w.events[0].prev_kv, None);
    assert_eq!(w.events[1].prev_kv.as_ref().map(|kv| kv.mod_revision), Some(4));
    let w = watch(&n, &watch_req("k", "", 5, false));
    assert_eq!(w.compact_revision, 0);
    assert_eq!(summary(&w.events), [s("k", 5, P), s("k", 6, P)]);
    // No start revision: nothing from history, not compacted.
    let w = watch(&n, &watch_req("k", "", 0, false));
    assert_eq!(
        (w.compact_revision, w.events.len(), rev_of(&w.header)),
        (0, 0, 6)
    );
}

/// A watch from the compacted revision answers the same while compaction
/// steps are pending, between them and after them: what compaction keeps of
/// that revision. A txn there that put a key and then deleted it leaves
/// nothing of the key (found by the model test).
#[test]
fn a_watch_from_the_compacted_revision_ignores_pending_compaction() {
    let mut n = MemNode::new();
    put(&mut n, "a", "0"); // 2
    // etcd 3.4 checks a txn's puts against its deletes' intervals, but
    // [c, "\0") is an empty interval to that check and deletes c and up.
    let t = txn(
        &mut n,
        TxnRequest {
            success: vec![
                op_put("b", "1"),
                op_put("c", "1"),
                RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key: "c".into(),
                        range_end: "\0".into(),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        },
    )
    .unwrap(); // 3: put b, put c, delete c
    assert_eq!(rev_of(&t.header), 3);
    put(&mut n, "d", "2"); // 4
    compact_only(&mut n, 3).unwrap();
    let req = watch_req("", "\0", 3, true);
    let want = [s("b", 3, P), s("d", 4, P)];
    assert_eq!(summary(&watch(&n, &req).events), want);
    while compact_step(&mut n, Some(1)) {
        assert_eq!(summary(&watch(&n, &req).events), want);
    }
    let w = watch(&n, &req);
    assert_eq!(summary(&w.events), want);
    assert_eq!(w.events[0].prev_kv, None);
}

/// Compactions that arrive while an earlier one's steps are pending leave the
/// store as the same compactions one at a time would (found by the model
/// test: the `r/` record of a put at the first compacted revision stayed).
#[test]
fn overlapping_compactions_end_as_sequential_ones() {
    let mut build = || {
        let mut n = MemNode::new();
        put(&mut n, "ab", "1"); // 2
        put(&mut n, "a", "1"); // 3
        put(&mut n, "b", "1"); // 4
        put(&mut n, "a", "2"); // 5
        n
    };
    let mut overlapping = build();
    compact_only(&mut overlapping, 2).unwrap();
    compact_only(&mut overlapping, 3).unwrap();
    compact_steps(&mut overlapping, Some(1));
    let mut sequential = build();
    compact(&mut sequential, 2).unwrap();
    compact(&mut sequential, 3).unwrap();
    assert_eq!(overlapping.store.map, sequential.store.map);
}

#[test]
fn start_beyond_the_current_revision() {
    let n = MemNode::new();
    // A fresh store is at revision 1 and has no history.
    let w = watch(&n, &watch_req("", "\0", 1, false));
    assert_eq!((w.events.len(), rev_of(&w.header)), (0, 1));
    let mut n = n;
    put(&mut n, "a", "1"); // 2
    put(&mut n, "a", "2"); // 3
    for start in [4, 5, 1000, i64::MAX, 0, -1, i64::MIN] {
        let w = watch(&n, &watch_req("a", "", start, true));
        assert_eq!(
            (w.events.len(), rev_of(&w.header), w.compact_revision),
            (0, 3, 0),
            "start {start}"
        );
    }
    // The current revision itself is history.
    let w = watch(&n, &watch_req("a", "", 3, false));
    assert_eq!(summary(&w.events), [s("a", 3, P)]);
}

/// A txn putting `count` keys `<prefix>0000`, `<prefix>0001`, ...
fn bulk(n: &mut MemNode, prefix: &str, count: usize) -> i64 {
    let ops = (0..count)
        .map(|i| op_put(&format!("{prefix}{i:04}"), "v"))
        .collect();
    rev_of(
        &txn(
            n,
            TxnRequest {
                success: ops,
                ..Default::default()
            },
        )
        .unwrap()
        .header,
    )
}

#[test]
fn an_answer_ends_after_the_revision_that_reaches_the_cap() {
    assert_eq!(WATCH_HISTORY_EVENTS, 1000);
    let mut n = MemNode::new();
    assert_eq!(bulk(&mut n, "a", 600), 2);
    assert_eq!(bulk(&mut n, "b", 600), 3);
    for i in 0..10 {
        put(&mut n, "c", &i.to_string()); // 4..=13
    }
    let all = watch_req("", "\0", 1, false);
    // The cap is reached inside revision 3: all of it, and no more.
    let w = watch(&n, &all);
    assert_eq!((w.events.len(), rev_of(&w.header)), (1200, 3));
    assert!(w.events[..600].iter().all(|e| mod_rev(e) == 2));
    assert!(w.events[600..].iter().all(|e| mod_rev(e) == 3));
    let w = watch(
        &n,
        &WatchCreateRequest {
            start_revision: 4,
            ..all.clone()
        },
    );
    assert_eq!((w.events.len(), rev_of(&w.header)), (10, 13));
    // From the middle: under the cap, up to the current revision.
    let w = watch(
        &n,
        &WatchCreateRequest {
            start_revision: 3,
            ..all.clone()
        },
    );
    assert_eq!((w.events.len(), rev_of(&w.header)), (610, 13));
    // Only events in the range count: watching "b…" from 1 sees 600 + 0.
    let w = watch(&n, &watch_req("b", "c", 1, false));
    assert_eq!((w.events.len(), rev_of(&w.header)), (600, 13));
    // The paged history is exactly what apply emitted.
    let emitted: Vec<Event> = events(&n).into_iter().map(|(_, e)| e).collect();
    assert_eq!(history(&n, &all), emitted);
}

#[test]
fn the_cap_reached_exactly_or_by_a_later_revision() {
    let mut n = MemNode::new();
    assert_eq!(bulk(&mut n, "a", 1000), 2);
    put(&mut n, "z", "1"); // 3
                           // Exactly 1,000 in revision 2: the answer stops there.
    let w = watch(&n, &watch_req("", "\0", 1, false));
    assert_eq!((w.events.len(), rev_of(&w.header)), (1000, 2));

    let mut n = MemNode::new();
    assert_eq!(bulk(&mut n, "a", 999), 2);
    put(&mut n, "y", "1"); // 3: the 1,000th event
    put(&mut n, "z", "1"); // 4
    let w = watch(&n, &watch_req("", "\0", 1, true));
    assert_eq!((w.events.len(), rev_of(&w.header)), (1000, 3));
    let w = watch(&n, &watch_req("", "\0", 4, true));
    assert_eq!(summary(&w.events), [s("z", 4, P)]);
}

#[test]
fn a_narrow_watch_far_behind_pages_through_the_revision_index() {
    assert_eq!(WATCH_HISTORY_ROWS, 10_000);
    let mut n = MemNode::new();
    put(&mut n, "w", "first"); // 2
    for i in 0..12_000 {
        put(&mut n, "other", &i.to_string()); // 3..=12_002
    }
    put(&mut n, "w", "last"); // 12_003
    let w = watch(&n, &watch_req("w", "", 1, false));
    // Revision 1 has no row: rows 1..=10_000 are revisions 2..=10_001.
    assert_eq!((rev_of(&w.header), w.events.len()), (10_001, 1));
    let rest = watch(&n, &watch_req("w", "", 10_002, false));
    assert_eq!((rev_of(&rest.header), rest.events.len()), (12_003, 1));
    assert_eq!(mod_rev(&rest.events[0]), 12_003);
    // The host's loop gets both.
    let all = history(&n, &watch_req("w", "", 1, false));
    assert_eq!(all.iter().map(mod_rev).collect::<Vec<_>>(), vec![2, 12_003]);
}

#[test]
fn big_values_end_an_answer_early() {
    assert_eq!(WATCH_HISTORY_BYTES, 3 * 1024 * 1024);
    let mut n = MemNode::new();
    let big = "x".repeat(1024 * 1024);
    for _ in 0..5 {
        put(&mut n, "big", &big); // 2..=6
    }
    // The event that reaches 3 MiB (the third) ends the answer.
    let w = watch(&n, &watch_req("big", "", 1, false));
    assert_eq!((w.events.len(), rev_of(&w.header)), (3, 4));
    let rest = watch(&n, &watch_req("big", "", 5, false));
    assert_eq!((rest.events.len(), rev_of(&rest.header)), (2, 6));
    assert_eq!(history(&n, &watch_req("big", "", 1, false)).len(), 5);
}
