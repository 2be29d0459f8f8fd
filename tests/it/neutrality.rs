//! Test 5: the Rust, the C, the JavaScript and the Python register guests are
//! interchangeable: the same commands give the same responses, error messages and exit
//! codes, and the same final state.

use std::collections::BTreeMap;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use raftvm_tests::{guest, raftvm_bin, Cluster, CmdOutput};

const RS: &str = "reg-rust";
const C: &str = "reg-c";
const JS: &str = "reg-js";
const PY: &str = "reg-py";
const KEYS: &[&str] = &["a", "b", "ab", "abc", "x", "y"];

/// Small deterministic PRNG (xorshift64*), so the sequence is the same every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

enum Kind {
    Call,
    Query,
}

struct Harness<'a> {
    c: &'a Cluster,
    model: BTreeMap<String, String>,
    steps: usize,
    failures: usize,
}

impl Harness<'_> {
    /// Runs `payload` on the four machines, asserts identical exit code and stdout,
    /// returns the Rust guest's output.
    #[track_caller]
    fn all(&mut self, kind: Kind, payload: &str) -> CmdOutput {
        let run = |m: &str| match kind {
            Kind::Call => self.c.call(0, m, payload),
            Kind::Query => self.c.query(0, m, payload),
        };
        let r = run(RS);
        for (name, o) in [(C, run(C)), (JS, run(JS)), (PY, run(PY))] {
            assert!(r.code.is_some() && o.code.is_some(), "a command was killed:\n{r:?}\n{name}: {o:?}");
            assert_eq!(
                (r.code, &r.stdout, &r.stderr),
                (o.code, &o.stdout, &o.stderr),
                "step {}: {payload:?} differs between {RS} and {name}:\n{r:?}\n{o:?}",
                self.steps
            );
            if !r.success() {
                assert!(!o.stderr.trim().is_empty(), "{name}: {o:?}");
            }
        }
        if !r.success() {
            assert_eq!(r.code, Some(1), "a guest error must exit with 1: {r:?}");
            assert!(!r.stderr.trim().is_empty(), "{r:?}");
            self.failures += 1;
        }
        self.steps += 1;
        r
    }

    /// Applies a command to every machine and checks it against the model where
    /// the protocol is explicit (elsewhere only their agreement is required, and the
    /// model follows what they did).
    fn apply(&mut self, cmd: &str) {
        let out = self.all(Kind::Call, cmd);
        let w: Vec<&str> = cmd.split(' ').collect();
        let ok = out.success();
        match w.as_slice() {
            ["set", k, v] => {
                assert_eq!(out.ok(), "OK", "{cmd}");
                self.model.insert(k.to_string(), v.to_string());
            }
            ["incr", k, n] => {
                let cur = self.model.get(*k).map(|v| v.parse::<i64>());
                if let (Some(Ok(cur)), Ok(n)) = (cur, n.parse::<i64>()) {
                    match cur.checked_add(n) {
                        Some(sum) => assert_eq!(out.ok(), sum.to_string(), "{cmd}"),
                        None => assert!(out.err().contains("overflow"), "{cmd}: {out:?}"),
                    }
                }
                if ok {
                    self.model.insert(k.to_string(), out.out().to_string());
                }
            }
            ["del", k] => {
                let want = if self.model.remove(*k).is_some() { "1" } else { "0" };
                assert_eq!(out.ok(), want, "{cmd}");
            }
            ["cas", k, old, new] => match self.model.get(*k) {
                Some(cur) if cur == old => {
                    assert_eq!(out.ok(), "OK", "{cmd}");
                    self.model.insert(k.to_string(), new.to_string());
                }
                Some(_) => {
                    assert!(out.err().contains(&format!("compare failed: {k}")), "{cmd}: {out:?}");
                }
                None => {
                    if ok {
                        self.model.insert(k.to_string(), new.to_string());
                    }
                }
            },
            ["get", k] => {
                if let Some(v) = self.model.get(*k) {
                    assert_eq!(out.ok(), v, "{cmd}");
                }
            }
            _ => {}
        }
    }

    fn query_get(&mut self, k: &str) {
        let out = self.all(Kind::Query, &format!("get {k}"));
        match self.model.get(k) {
            Some(v) => assert_eq!(out.ok(), v),
            None => assert!(out.err().contains(&format!("not found: {k}")), "{out:?}"),
        }
    }

    fn expected_list(&self, prefix: &str) -> Vec<String> {
        self.model.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| format!("{k}={v}")).collect()
    }
}

#[test]
fn rust_c_js_and_python_register_guests_agree() {
    let (rs, cg) = (guest("register-rust"), guest("register-c"));
    let c = Cluster::start(1);
    c.install_ok(0, RS, &rs);
    c.install_ok(0, C, &cg);
    // 12 MB of SpiderMonkey and 18 MB of CPython to compile: more than the usual command
    // timeout.
    for (name, file) in [(JS, guest("register-js")), (PY, guest("register-py"))] {
        let out = c.install(0, name, &file, &["--command-timeout=300s"]);
        assert_eq!(out.ok(), format!("installed {name} sha256={}", raftvm_tests::sha256_file(&file)), "{out:?}");
    }
    let mut h = Harness { c: &c, model: BTreeMap::new(), steps: 0, failures: 0 };

    // Edge cases first, then a long pseudo-random mix.
    for cmd in [
        "get a",
        "del a",
        "set a 1",
        "incr a 2",
        "incr fresh 5",
        "cas a 3 10",
        "cas a 3 11",
        "cas nothing 1 2",
        "set s hello",
        "incr s 1",
        "incr a -4",
        "incr a notanumber",
        "bogus command",
        "set",
        "get fresh",
        "del fresh",
        "del fresh",
        // i64 edges and number syntax (the JavaScript guest parses with BigInt).
        "incr big 9223372036854775807",
        "incr big 1",
        "incr neg -9223372036854775808",
        "incr neg -1",
        "incr neg 9223372036854775808",
        "incr p +5",
        "incr p 007",
        "incr p -",
        "incr p +",
        "incr p 1e3",
        "set sp  x",
        "set x y z",
        "cas x - y",
        "cas x - z",
    ] {
        h.apply(cmd);
    }
    for q in ["list a b", "count x", "nope", "get", ""] {
        let out = h.all(Kind::Query, q);
        assert!(!out.success(), "{q:?}: {out:?}");
    }
    // Bytes that are not UTF-8 (a stray continuation, overlong, a surrogate, truncated,
    // above U+10FFFF) are refused alike; valid multi-byte text is not.
    for bad in [&b"\xff"[..], b"set a \xc0\xaf", b"set a \xed\xa0\x80", b"set a \xe2\x82", b"set a \xf4\x90\x80\x80"] {
        let answers: Vec<_> = [RS, C, JS, PY].iter().map(|m| raw_call(&c, m, bad)).collect();
        assert!(answers.iter().all(|a| a == &answers[0]), "{bad:?}: {answers:?}");
        assert!(answers[0].1.contains("invalid UTF-8") && answers[0].0 == Some(1), "{bad:?}: {answers:?}");
    }
    h.apply("set \u{e9}t\u{e9} \u{1f600}");
    h.query_get("\u{e9}t\u{e9}");
    h.query_get("a");
    h.query_get("fresh");

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for step in 0..80 {
        let k = rng.pick(KEYS);
        let cmd = match rng.below(10) {
            0..=2 => format!("set {k} {}", ["v", "w", "7", "-3", "0", "long_value_x"][rng.below(6) as usize]),
            3..=4 => format!("incr {k} {}", rng.below(20)),
            5 => format!("del {k}"),
            6..=7 => {
                let old = match (rng.below(2), h.model.get(k)) {
                    (0, Some(cur)) => cur.clone(),
                    _ => "stale".to_string(),
                };
                format!("cas {k} {old} c{step}")
            }
            8 => format!("get {k}"),
            _ => {
                h.query_get(k);
                continue;
            }
        };
        h.apply(&cmd);
    }
    assert!(h.steps >= 50, "only {} commands", h.steps);
    assert!(h.failures >= 5, "the sequence should exercise failing commands, got {} failures", h.failures);

    for prefix in ["", "a", "ab", "zzz"] {
        let q = if prefix.is_empty() { "list".to_string() } else { format!("list {prefix}") };
        let out = h.all(Kind::Query, &q);
        let got: Vec<&str> = out.ok().lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(got, h.expected_list(prefix), "{q}: {out:?}");
    }
    let out = h.all(Kind::Query, "count");
    assert_eq!(out.ok(), h.model.len().to_string());
    assert!(h.model.len() >= 3, "final state too small to be meaningful: {:?}", h.model);

    // Informational: the per-machine hashes need not match (a host may mix the
    // module identity into them, or the guests may encode values differently).
    let hash = c.hash(0).expect("hash");
    eprintln!("machine hashes: {:?}", hash.machines);
}

/// `raftvm call MACHINE <bytes>` on node 0 with a payload that need not be UTF-8: the exit
/// code and stderr.
fn raw_call(c: &Cluster, machine: &str, payload: &[u8]) -> (Option<i32>, String) {
    let out = Command::new(raftvm_bin())
        .arg("call")
        .arg(machine)
        .arg(OsStr::from_bytes(payload))
        .args(["--endpoints", &c.endpoint(0), "--command-timeout", "15s"])
        .output()
        .expect("running raftvm");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}
