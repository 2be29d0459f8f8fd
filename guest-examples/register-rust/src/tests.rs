//! Native tests: the protocol logic against an in-memory, transactional host,
//! driven by tests/transcript.txt (which register-c must reproduce too).

use super::*;
use std::collections::BTreeMap;

/// An in-memory store with the host's per-command transactions: writes and
/// events go to a pending layer that `commit`/`rollback` resolve.
#[derive(Default)]
struct MemHost {
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    events: Vec<(Vec<u8>, Vec<u8>)>,
}

impl MemHost {
    fn view(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut view = self.committed.clone();
        for (k, v) in &self.pending {
            match v {
                Some(v) => view.insert(k.clone(), v.clone()),
                None => view.remove(k),
            };
        }
        view
    }
    fn commit(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.committed = self.view();
        self.pending.clear();
        std::mem::take(&mut self.events)
    }
    fn rollback(&mut self) {
        self.pending.clear();
        self.events.clear();
    }
}

impl Host for MemHost {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.pending.get(key) {
            Some(v) => v.clone(),
            None => self.committed.get(key).cloned(),
        }
    }
    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
    }
    fn remove(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        assert!(limit <= PAGE);
        self.view()
            .into_iter()
            .filter(|(k, _)| k.as_slice() >= start && (end.is_empty() || k.as_slice() < end))
            .take(limit as usize)
            .collect()
    }
    fn emit(&mut self, key: &[u8], event: &[u8]) {
        self.events.push((key.to_vec(), event.to_vec()));
    }
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b's' => out.push(b' '),
                b'n' => out.push(b'\n'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).expect("bad \\x escape"));
                    i += 2;
                }
                c => panic!("bad escape \\{}", c as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Splits `word rest` into (`word`, `rest`); `rest` is empty without a space.
fn split_word(line: &str) -> (&str, &str) {
    line.split_once(' ').unwrap_or((line, ""))
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>),
    Err(String),
}

#[test]
fn transcript() {
    let text = include_str!("../tests/transcript.txt");
    let mut host = MemHost::default();
    let mut lines = text.lines().enumerate().peekable();
    let mut checked = 0;
    while let Some((n, line)) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (call, arg) = split_word(line);
        let result = match call {
            "apply" => apply(&mut host, &unescape(arg)),
            "query" => query(&host, &unescape(arg)).inspect(|_| {
                assert!(
                    host.pending.is_empty() && host.events.is_empty(),
                    "query wrote"
                );
            }),
            "revoke" => {
                let keys: Vec<Vec<u8>> = arg
                    .split(' ')
                    .filter(|k| !k.is_empty())
                    .map(unescape)
                    .collect();
                lease_revoked(&mut host, &keys);
                Ok(Vec::new())
            }
            other => panic!("line {}: unknown call {other}", n + 1),
        };
        let got = match result {
            Ok(bytes) => Outcome::Ok(bytes, host.commit()),
            Err(msg) => {
                host.rollback();
                Outcome::Err(msg)
            }
        };
        // Expected: the indented lines that follow.
        let mut expected_events = Vec::new();
        let mut expected = None;
        while let Some((_, next)) = lines.peek() {
            let Some(exp) = next.strip_prefix("  ") else {
                break;
            };
            let (kind, rest) = split_word(exp);
            match kind {
                "ok" => expected = Some(Ok(unescape(rest))),
                "err" => expected = Some(Err(show(&unescape(rest)))),
                "event" => {
                    let (k, v) = rest.split_once('=').expect("event KEY=VALUE");
                    expected_events.push((unescape(k), unescape(v)));
                }
                other => panic!("unknown expectation {other}"),
            }
            lines.next();
        }
        let expected =
            match expected.unwrap_or_else(|| panic!("line {}: no expected result", n + 1)) {
                Ok(bytes) => Outcome::Ok(bytes, expected_events),
                Err(msg) => Outcome::Err(msg),
            };
        assert_eq!(got, expected, "line {}: {line}", n + 1);
        checked += 1;
    }
    assert!(checked > 50);
}

#[test]
fn list_and_count_page_through_the_store() {
    let mut host = MemHost::default();
    for i in 0..250 {
        apply(&mut host, format!("set k{i:03} v{i}").as_bytes()).unwrap();
        host.commit();
    }
    apply(&mut host, b"set j 0").unwrap();
    apply(&mut host, b"set l 0").unwrap();
    host.commit();
    assert_eq!(query(&host, b"count").unwrap(), b"252");
    let list = query(&host, b"list k").unwrap();
    let lines: Vec<String> = show(&list).lines().map(String::from).collect();
    assert_eq!(lines.len(), 250);
    assert_eq!(lines[0], "k000=v0");
    assert_eq!(lines[249], "k249=v249");
    assert!(lines.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        query(&host, b"list")
            .unwrap()
            .split(|b| *b == b'\n')
            .count(),
        252
    );
}

#[test]
fn prefix_end_handles_0xff() {
    assert_eq!(prefix_end(b""), b"");
    assert_eq!(prefix_end(b"ab"), b"ac");
    assert_eq!(prefix_end(b"a\xff"), b"b");
    assert_eq!(prefix_end(b"\xff\xff"), b"");
}

#[test]
fn leader_change_message() {
    assert_eq!(
        super::leader_change_message(true, 7),
        "register: leader change: is-leader=true term=7"
    );
}
