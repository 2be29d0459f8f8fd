//! Misbehaving guests and invalid modules must not hurt the cluster.

use std::time::Duration;

use raftvm_tests::{components, contains_any_ci, guest, write_file, Cluster};

const H: &str = "hostile";

/// The words the spec promises for trap / fuel / memory failures. The host may
/// word a failure differently (an allocator hitting the memory cap often ends in
/// an `unreachable` trap), so any of them is accepted for every failure.
const FAILURE_WORDS: &[&str] = &["trap", "fuel", "memory"];

#[track_caller]
fn assert_guest_failure(out: &raftvm_tests::CmdOutput, preferred: &str) {
    assert_eq!(out.code, Some(1), "a guest failure must exit with code 1: {out:?}");
    let err = out.err();
    assert!(
        contains_any_ci(err, FAILURE_WORDS),
        "error message should mention {preferred:?} (or one of {FAILURE_WORDS:?}): {out:?}"
    );
    if !contains_any_ci(err, &[preferred]) {
        eprintln!("note: failure message does not mention {preferred:?}: {err:?}");
    }
    assert!(out.stdout.trim().is_empty(), "a failed call printed a response: {out:?}");
}

/// Test 4a: traps, infinite loops and memory bombs fail the command (on every
/// replica alike) without taking down nodes or diverging state.
#[test]
fn hostile_guest_cannot_break_the_cluster() {
    let file = guest("hostile");
    let c = Cluster::start(3);
    c.install_everywhere(0, H, &file);
    c.call(1, H, "set before ok").ok();

    assert_guest_failure(&c.call(0, H, "trap"), "trap");
    assert_guest_failure(&c.call(1, H, "loop"), "fuel");
    assert_guest_failure(&c.call(2, H, "bomb"), "memory");

    // The write made before the trap is discarded everywhere.
    let out = c.call(0, H, "write-then-trap k");
    assert_guest_failure(&out, "trap");
    for i in 0..3 {
        let q = c.query(i, H, "get k");
        assert!(q.err().contains("not found: k"), "discarded write visible on {}: {q:?}", c.node(i).name);
    }

    // Queries are bounded too.
    let q = c.query(1, H, "loop");
    q.err();
    assert!(contains_any_ci(&q.stderr, FAILURE_WORDS), "{q:?}");

    // The machine and the cluster still work, and every node is alive.
    c.call(2, H, "set k v").ok();
    assert_eq!(c.query(0, H, "get k").ok(), "v");
    assert_eq!(c.call(1, H, "get k").ok(), "v");
    assert_eq!(c.query(1, H, "get before").ok(), "ok");
    // Failures repeat deterministically.
    assert_guest_failure(&c.call(2, H, "trap"), "trap");
    assert_eq!(c.query(2, H, "get k").ok(), "v");

    assert_eq!(c.running(), vec![0, 1, 2], "a node died");
    let h = c.assert_converged(Duration::from_secs(30));
    assert!(h.machines.contains_key(H), "{h:?}");
    for i in 0..3 {
        let out = c.query_serializable(i, H, "get k");
        assert_eq!(out.ok(), "v", "node {}", c.node(i).name);
    }
}

/// A guest's memory is hidden state: here a global count of the calls its instance
/// served, written to the store. A replica that restarted has a younger instance than
/// the others, so unless every replica runs each log entry on an instance created for
/// it, the stored counts (and the replica hashes) differ.
#[test]
fn hidden_guest_state_cannot_make_replicas_diverge() {
    let file = guest("hostile");
    let c = Cluster::start(3);
    c.install_everywhere(0, H, &file);
    let leader = c.leader();
    let follower = (leader + 1) % 3;
    for i in 0..5 {
        c.call(leader, H, &format!("set k{i} v")).ok();
    }
    c.assert_converged(Duration::from_secs(30));
    c.stop(follower);
    c.restart(follower);
    c.call(leader, H, "set after-restart v").ok();
    let stashed = c.call(leader, H, "stash count");
    c.assert_converged(Duration::from_secs(30));
    assert_eq!(stashed.ok(), "1", "the entry's instance served calls before it: {stashed:?}");
    for i in 0..3 {
        assert_eq!(c.query_serializable(i, H, "get count").ok(), "1", "node {}", c.node(i).name);
    }
}

/// Test 4b: `module install` refuses invalid modules without proposing them;
/// a minimal valid hand-written component (the control case) is accepted.
#[test]
fn invalid_modules_are_refused_at_install() {
    let real = std::fs::read(guest("register-rust")).unwrap();
    let c = Cluster::start(3);
    let dir = c.dir().to_path_buf();

    // (name, bytes, a word the refusal must mention, case-insensitively)
    let mut bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"this is not a WebAssembly component \x00\x01\x02\xff".to_vec(), ""),
        ("empty", Vec::new(), ""),
        ("wrong-exports", wat::parse_str(components::unrelated_component()).unwrap(), "apply"),
        ("no-apply", wat::parse_str(components::machine_without_apply()).unwrap(), "apply"),
        ("bad-apply-type", wat::parse_str(components::machine_with_wrong_apply_signature()).unwrap(), "apply"),
        (
            "wasi-import",
            wat::parse_str(components::machine_importing_wasi_environment()).unwrap(),
            "wasi:cli/environment",
        ),
    ];
    // A real guest cut short.
    bad.push(("truncated", real[..real.len() / 2].to_vec(), ""));

    for (name, bytes, cause) in &bad {
        let file = write_file(&dir, &format!("{name}.wasm"), bytes);
        let out = c.install(0, name, &file, &[]);
        assert!(matches!(out.code, Some(code) if code != 0), "invalid module {name} was accepted: {out:?}");
        assert!(!out.stderr.trim().is_empty(), "refusal of {name} has no message: {out:?}");
        assert!(contains_any_ci(&out.stderr, &[cause]), "refusal of {name} should mention {cause:?}: {out:?}");
        // A WASI import is a toolchain's default: the refusal says how to build without.
        assert_eq!(*name == "wasi-import", out.stderr.contains("--stub-wasi"), "{name}: {out:?}");
        assert!(!out.stdout.contains("installed"), "{out:?}");
        eprintln!("{name}: refused: {}", out.stderr.trim());
        let q = c.call(1, name, "anything");
        q.err();
    }

    // Control: the same hand-written component without the defect installs and runs.
    let ok = write_file(&dir, "wat-ok.wasm", &wat::parse_str(components::valid_machine()).unwrap());
    c.install_everywhere(2, "wat-ok", &ok);
    assert_eq!(c.call(0, "wat-ok", "whatever").ok(), "wat-ok");
    assert_eq!(c.query(1, "wat-ok", "whatever").ok(), "wat-ok");

    for i in 0..3 {
        // (Built-in machines may be listed too.)
        let list = c.module_list(i);
        let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
        assert!(names.contains(&"wat-ok"), "{} lists {names:?}", c.node(i).name);
        for (name, _, _) in &bad {
            assert!(!names.contains(name), "refused module {name} is listed on {}: {names:?}", c.node(i).name);
        }
    }
    assert_eq!(c.running(), vec![0, 1, 2]);
    c.assert_converged(Duration::from_secs(30));
}
