//! Bench keys: `PREFIX` followed by the key index in decimal, zero-padded to exactly
//! `--key-size` bytes (index 7, key size 8: `raftvm-bench/00000007`). Decimal keeps
//! the keys readable in `etcdctl get --prefix raftvm-bench/`; the index must fit in
//! `--key-size` digits (key size 8 holds a key space of up to 100,000,000).

use anyhow::{bail, Result};

/// Default `--key-prefix`.
pub const DEFAULT_PREFIX: &str = "raftvm-bench/";

/// The key space: prefix, key size, number of distinct keys.
#[derive(Clone, Debug)]
pub struct KeySpace {
    prefix: Vec<u8>,
    key_size: usize,
    space: u64,
}

impl KeySpace {
    pub fn new(prefix: &str, key_size: usize, space: u64) -> Result<KeySpace> {
        if key_size == 0 {
            bail!("--key-size must be at least 1");
        }
        if space == 0 {
            bail!("--key-space must be at least 1");
        }
        // 10^key_size overflows u64 from 20 digits on; every u64 fits in 20 digits.
        if key_size < 20 && space > 10u64.pow(key_size as u32) {
            bail!(
                "--key-space {space} does not fit in --key-size {key_size}: keys are the index in decimal, \
                 zero-padded to key-size digits (at most {} keys)",
                10u64.pow(key_size as u32)
            );
        }
        Ok(KeySpace { prefix: prefix.as_bytes().to_vec(), key_size, space })
    }

    pub fn space(&self) -> u64 {
        self.space
    }

    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// `[prefix, prefix + 1)`: every key under the prefix (etcd's `--prefix`).
    pub fn range_end(&self) -> Vec<u8> {
        prefix_end(&self.prefix)
    }

    /// A reusable buffer for [`KeySpace::key`].
    pub fn buffer(&self) -> KeyBuf {
        let mut buf = Vec::with_capacity(self.prefix.len() + self.key_size);
        buf.extend_from_slice(&self.prefix);
        buf.resize(self.prefix.len() + self.key_size, b'0');
        KeyBuf { buf, digits_at: self.prefix.len() }
    }

    /// The key of index `i` (allocates; the bench loops use [`KeyBuf`]).
    pub fn key(&self, i: u64) -> Vec<u8> {
        self.buffer().key(i).to_vec()
    }
}

/// A key buffer holding the prefix; [`KeyBuf::key`] writes an index's digits into it.
pub struct KeyBuf {
    buf: Vec<u8>,
    digits_at: usize,
}

impl KeyBuf {
    pub fn key(&mut self, mut i: u64) -> &[u8] {
        for d in self.buf[self.digits_at..].iter_mut().rev() {
            *d = b'0' + (i % 10) as u8;
            i /= 10;
        }
        &self.buf
    }
}

/// etcd's prefix range end: the store's prefix end, except that a prefix of only 0xff
/// bytes (no end) is etcd's `"\0"` (every key from the prefix on).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match crate::storage::prefix_end(prefix) {
        e if e.is_empty() => vec![0],
        e => e,
    }
}

/// How each client picks the key of its next operation.
pub struct Picker {
    space: u64,
    sequential: bool,
    rng: SplitMix64,
}

impl Picker {
    pub fn new(space: u64, sequential: bool, seed: u64) -> Picker {
        Picker { space, sequential, rng: SplitMix64(seed) }
    }

    /// Key index for global operation number `op`: `op mod space` with
    /// `--sequential-keys`, else uniform in `0..space`.
    pub fn pick(&mut self, op: u64) -> u64 {
        if self.sequential {
            op % self.space
        } else {
            // Lemire's multiply-shift: uniform enough for a benchmark, no division.
            ((self.rng.next_u64() as u128 * self.space as u128) >> 64) as u64
        }
    }
}

/// A tiny, fast PRNG (per client, so no shared state).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `len` printable bytes (a deterministic pseudo-random pattern), for values.
pub fn value(len: usize, seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefix_plus_zero_padded_decimal_of_exactly_key_size() {
        let ks = KeySpace::new(DEFAULT_PREFIX, 8, 1_000_000).unwrap();
        assert_eq!(ks.key(0), b"raftvm-bench/00000000");
        assert_eq!(ks.key(7), b"raftvm-bench/00000007");
        assert_eq!(ks.key(999_999), b"raftvm-bench/00999999");
        let mut buf = ks.buffer();
        // The buffer is reused: a shorter index after a longer one leaves no stale digits.
        assert_eq!(buf.key(123_456), b"raftvm-bench/00123456");
        assert_eq!(buf.key(5), b"raftvm-bench/00000005");
        assert_eq!(KeySpace::new("p/", 3, 1000).unwrap().key(999), b"p/999");
        let wide = KeySpace::new("", 24, u64::MAX).unwrap();
        assert_eq!(wide.key(u64::MAX), format!("{:024}", u64::MAX).into_bytes());
    }

    #[test]
    fn distinct_indices_give_distinct_keys_of_the_same_length() {
        let ks = KeySpace::new("k", 4, 10_000).unwrap();
        let keys: std::collections::HashSet<Vec<u8>> = (0..10_000).map(|i| ks.key(i)).collect();
        assert_eq!(keys.len(), 10_000);
        assert!(keys.iter().all(|k| k.len() == 5));
    }

    #[test]
    fn a_key_space_that_does_not_fit_the_key_size_is_refused() {
        assert!(KeySpace::new("", 2, 100).is_ok());
        let e = KeySpace::new("", 2, 101).unwrap_err().to_string();
        assert!(e.contains("--key-size"), "{e}");
        assert!(KeySpace::new("", 0, 1).is_err());
        assert!(KeySpace::new("", 8, 0).is_err());
    }

    #[test]
    fn pickers_stay_in_the_key_space() {
        let mut seq = Picker::new(50, true, 1);
        assert_eq!((0..120).map(|op| seq.pick(op)).collect::<Vec<_>>()[48..53], [48, 49, 0, 1, 2]);
        let mut rnd = Picker::new(10, false, 42);
        let mut seen = [0u32; 10];
        for op in 0..10_000 {
            seen[rnd.pick(op) as usize] += 1;
        }
        // Uniform: every key drawn, none wildly over-represented.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        let mut one = Picker::new(1, false, 3);
        assert!((0..100).all(|op| one.pick(op) == 0));
    }

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"raftvm-bench/"), b"raftvm-bench0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
