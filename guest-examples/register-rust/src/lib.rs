//! register-rust: an example raftvm guest, a map of registers driven by a
//! small text protocol. `guest-examples/register-c` implements the same
//! machine in C; both must answer every command with the same bytes. The
//! protocol is specified in docs/guest-abi.md ("Example: the register
//! protocol"):
//!
//! ```text
//! apply  set KEY VALUE      -> OK                         event (KEY, VALUE)
//! apply  incr KEY N         -> new value, decimal         event (KEY, new value)
//! apply  del KEY            -> 1 if KEY existed, else 0   event (KEY, "") if it existed
//! apply  cas KEY OLD NEW    -> OK (OLD `-`: KEY must not exist)  event (KEY, NEW)
//! apply  get KEY            -> value
//! query  get KEY | list [PREFIX] | count
//! ```
//!
//! The logic is written against the [`Host`] trait so that it runs natively
//! in `cargo test`; on wasm32 the `guest` module binds it to the WIT imports.

/// Entries fetched per `store.scan` call.
pub const PAGE: u32 = 100;

/// What the machine needs from the host (the WIT imports it uses).
pub trait Host {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn set(&mut self, key: &[u8], value: &[u8]);
    fn remove(&mut self, key: &[u8]);
    /// Ascending entries with `start <= key < end` (empty `end`: unbounded),
    /// at most `limit`.
    fn scan(&self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)>;
    fn emit(&mut self, key: &[u8], event: &[u8]);
}

type Reply = Result<Vec<u8>, String>;

/// Splits a command on single spaces (so `a  b` has an empty middle token).
fn tokens(bytes: &[u8]) -> Result<Vec<&str>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "invalid UTF-8".to_string())?;
    Ok(text.split(' ').collect())
}

/// The `N` arguments after the verb, all non-empty, or `usage: ...`.
fn args<'a, const N: usize>(tokens: &[&'a str], usage: &str) -> Result<[&'a str; N], String> {
    match <[&str; N]>::try_from(&tokens[1..]) {
        Ok(args) if args.iter().all(|a| !a.is_empty()) => Ok(args),
        _ => Err(format!("usage: {usage}")),
    }
}

/// Decimal i64 as Rust's `str::parse` reads it: an optional `+` or `-`, then
/// one or more ASCII digits, in range.
fn parse_i64(text: &str) -> Option<i64> {
    text.parse().ok()
}

/// Apply one command (the `apply` export).
pub fn apply(host: &mut impl Host, command: &[u8]) -> Reply {
    let t = tokens(command)?;
    match t[0] {
        "set" => {
            let [key, value] = args(&t, "set KEY VALUE")?;
            host.set(key.as_bytes(), value.as_bytes());
            host.emit(key.as_bytes(), value.as_bytes());
            Ok(b"OK".to_vec())
        }
        "incr" => {
            let [key, n] = args(&t, "incr KEY N")?;
            let n = parse_i64(n).ok_or_else(|| format!("invalid number: {n}"))?;
            let current = match host.get(key.as_bytes()) {
                None => 0,
                Some(v) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(parse_i64)
                    .ok_or_else(|| format!("not a number: {key}"))?,
            };
            let new = current
                .checked_add(n)
                .ok_or_else(|| "overflow".to_string())?;
            let new = new.to_string();
            host.set(key.as_bytes(), new.as_bytes());
            host.emit(key.as_bytes(), new.as_bytes());
            Ok(new.into_bytes())
        }
        "del" => {
            let [key] = args(&t, "del KEY")?;
            if host.get(key.as_bytes()).is_some() {
                host.remove(key.as_bytes());
                host.emit(key.as_bytes(), b"");
                Ok(b"1".to_vec())
            } else {
                Ok(b"0".to_vec())
            }
        }
        "cas" => {
            let [key, old, new] = args(&t, "cas KEY OLD NEW")?;
            let current = host.get(key.as_bytes());
            let matches = match (old, current.as_deref()) {
                ("-", None) => true,
                ("-", Some(_)) => false,
                (old, Some(cur)) => cur == old.as_bytes(),
                (_, None) => false,
            };
            if !matches {
                return Err(format!("compare failed: {key}"));
            }
            host.set(key.as_bytes(), new.as_bytes());
            host.emit(key.as_bytes(), new.as_bytes());
            Ok(b"OK".to_vec())
        }
        "get" => get(host, &t),
        verb => Err(format!("unknown command: {verb}")),
    }
}

/// Answer one read-only request (the `query` export).
pub fn query(host: &impl Host, request: &[u8]) -> Reply {
    let t = tokens(request)?;
    match t[0] {
        "get" => get(host, &t),
        "list" => {
            let prefix = match t.len() {
                1 => "",
                _ => {
                    let [prefix] = args(&t, "list [PREFIX]")?;
                    prefix
                }
            };
            let mut out = Vec::new();
            scan_prefix(host, prefix.as_bytes(), |key, value| {
                if !out.is_empty() {
                    out.push(b'\n');
                }
                out.extend_from_slice(key);
                out.push(b'=');
                out.extend_from_slice(value);
            });
            Ok(out)
        }
        "count" => {
            let [] = args(&t, "count")?;
            let mut n: u64 = 0;
            scan_prefix(host, b"", |_, _| n += 1);
            Ok(n.to_string().into_bytes())
        }
        verb => Err(format!("unknown query: {verb}")),
    }
}

/// `on-lease-revoked`: the keys go away (with a deletion event each).
pub fn lease_revoked(host: &mut impl Host, keys: &[Vec<u8>]) {
    for key in keys {
        if host.get(key).is_some() {
            host.remove(key);
            host.emit(key, b"");
        }
    }
}

/// The message `on-leader-change` logs (at info level).
pub fn leader_change_message(is_leader: bool, term: u64) -> String {
    format!("register: leader change: is-leader={is_leader} term={term}")
}

fn get(host: &impl Host, t: &[&str]) -> Reply {
    let [key] = args(t, "get KEY")?;
    host.get(key.as_bytes())
        .ok_or_else(|| format!("not found: {key}"))
}

/// The smallest key greater than every key that starts with `prefix`, or
/// empty (unbounded) if there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// Visits every entry whose key starts with `prefix`, in key order, fetching
/// `PAGE` entries per `store.scan`.
fn scan_prefix(host: &impl Host, prefix: &[u8], mut visit: impl FnMut(&[u8], &[u8])) {
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    loop {
        let page = host.scan(&start, &end, PAGE);
        let full = page.len() >= PAGE as usize;
        for (key, value) in &page {
            if key.starts_with(prefix) {
                visit(key, value);
            }
        }
        match page.last() {
            Some((last, _)) if full => {
                // Next page: strictly after `last`.
                start = last.clone();
                start.push(0);
            }
            _ => break,
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod guest;

#[cfg(test)]
mod tests;
