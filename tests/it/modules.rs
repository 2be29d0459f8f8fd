//! Module lifecycle: an upgrade takes effect in log order on every node and keeps the
//! machine's data; modules over the size limit are refused before anything is proposed;
//! modules near the limit still reach a follower that missed several of them; every
//! member has compiled a module before its install is proposed.

use std::time::Duration;

use raftvm_tests::{guest, poll_until, write_file, Cluster};

#[test]
fn upgrade_swaps_code_in_log_order_and_keeps_data() {
    let c = Cluster::start(3);
    let v1 = guest("register-rust");
    let v2 = guest("hostile");
    let sha1 = c.install_everywhere(0, "m", &v1);
    assert_eq!(c.call(1, "m", "set a 1").ok(), "OK");
    assert_eq!(c.call(2, "m", "incr a 41").ok(), "42");

    // Upgrade through another member: a different component under the same name.
    let sha2 = c.install_everywhere(1, "m", &v2);
    assert_ne!(sha1, sha2);
    for i in 0..3 {
        let list = c.module_list(i);
        let m = list.iter().find(|m| m.name == "m").expect("m listed");
        assert_eq!(m.sha256, sha2, "node {} still lists the old code", c.node(i).name);
        // The new code reads the data the old code wrote.
        assert_eq!(c.query(i, "m", "get a").ok(), "42");
    }
    // Commands after the upgrade run the new code everywhere: `incr` is unknown to it,
    // `trap` exists only in it.
    let out = c.call(0, "m", "incr a 1");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.err().contains("unknown command: incr"), "{out:?}");
    let out = c.call(2, "m", "trap");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.err().to_lowercase().contains("trap"), "{out:?}");
    assert_eq!(c.query(1, "m", "get a").ok(), "42", "the failed commands changed nothing");
    c.assert_converged(Duration::from_secs(20));

    // A restart prunes the compile cache: the old code's artifact goes, the new one stays.
    let cache = c.node(1).data_dir.join("cache");
    let artifacts = || -> Vec<String> {
        std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    assert!(artifacts().iter().any(|n| n.starts_with(&sha1)), "{:?}", artifacts());
    c.stop(1);
    c.restart(1);
    poll_until(Duration::from_secs(30), "the restarted member to prune its cache", || {
        let names = artifacts();
        if !names.iter().any(|n| n.starts_with(&sha1)) { Ok(()) } else { Err(format!("{names:?}")) }
    });
    assert!(artifacts().iter().any(|n| n.starts_with(&sha2)), "{:?}", artifacts());
    assert_eq!(c.query(1, "m", "get a").ok(), "42");
}

#[test]
fn oversized_module_is_refused_before_proposing() {
    let c = Cluster::start(1);
    // The built-in kv machine is proposed right after the election: let it land first so
    // the log index below only moves if the install is proposed.
    poll_until(Duration::from_secs(20), "the built-in kv machine", || {
        let list = c.module_list(0);
        if list.iter().any(|m| m.name == "kv") { Ok(()) } else { Err(format!("{list:?}")) }
    });
    let before = c.status(0).expect("status").last_log_index;
    // A wasm header followed by padding: over the 32 MiB limit, under the transport limit.
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.resize(32 * 1024 * 1024 + 4096, 0);
    let file = write_file(c.dir(), "big.wasm", &bytes);
    let out = c.install(0, "big", &file, &[]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("over the 33554432-byte limit"), "{out:?}");
    assert!(c.module_list(0).iter().all(|m| m.name != "big"));
    assert_eq!(c.status(0).expect("status").last_log_index, before, "nothing was proposed");
}

/// `component` with a custom section of `pad` bytes of `fill` appended: as valid and as
/// runnable as before, and `pad` bytes larger.
fn padded(component: &[u8], pad: usize, fill: u8) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"raftvm-test-padding";
    let mut body = Vec::with_capacity(pad + 32);
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.resize(body.len() + pad, fill);
    let mut out = component.to_vec();
    out.push(0); // custom section
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// openraft sends up to 32 entries per AppendEntries whatever their size: three installs
/// of ~30 MiB that a follower missed would make a ~90 MiB message, over the 64 MiB peer
/// limit, refused on every retry. The leader splits such a call instead.
#[test]
fn large_modules_reach_a_follower_that_missed_them() {
    let base = std::fs::read(guest("register-rust")).expect("register-rust.wasm");
    let c = Cluster::start(3);
    let leader = c.leader();
    let behind = (0..3).find(|&i| i != leader).expect("a follower");
    c.stop(behind);
    for k in 0..3u8 {
        let bytes = padded(&base, 30 * 1024 * 1024, b'a' + k);
        let file = write_file(c.dir(), &format!("big{k}.wasm"), &bytes);
        let out = c.install(leader, &format!("big{k}"), &file, &["--command-timeout=120s"]);
        assert!(out.success(), "{out:?}");
    }
    assert_eq!(c.call(leader, "big2", "set a 1").ok(), "OK");
    c.restart(behind);
    poll_until(Duration::from_secs(60), "the follower to run the last module", || {
        let out = c.query_serializable(behind, "big2", "get a");
        if out.success() && out.out() == "1" { Ok(()) } else { Err(format!("{out:?}")) }
    });
    c.assert_converged(Duration::from_secs(30));
}

/// A member compiles a module when it applies the install unless it has it compiled
/// already, and nothing else applies meanwhile: seconds for a Python guest. The member
/// that takes the install has every other member compile it first.
#[test]
fn every_member_compiles_a_module_before_its_install_is_proposed() {
    let file = guest("register-py");
    let sha = raftvm_tests::sha256_file(&file);
    let c = Cluster::start(3);
    let leader = c.leader();
    let via = (0..3).find(|&i| i != leader).expect("a follower");
    let out = c.install(via, "py", &file, &["--command-timeout=300s"]);
    assert_eq!(out.ok(), format!("installed py sha256={sha}"), "{out:?}");
    // Right when the install returns (applied on the member that took it): every member
    // has the compiled artifact in its cache.
    for i in 0..3 {
        let cache = c.node(i).data_dir.join("cache");
        let names: Vec<String> = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{}: {e}", cache.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with(&sha) && n.ends_with(".cwasm")),
            "{} has not compiled the module: {names:?}",
            c.node(i).name
        );
    }
    for i in 0..3 {
        poll_until(Duration::from_secs(30), "every member to run the module", || {
            let out = c.query_serializable(i, "py", "count");
            if out.success() && out.out() == "0" { Ok(()) } else { Err(format!("{out:?}")) }
        });
    }
}
