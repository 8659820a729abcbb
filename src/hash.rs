//! A small, fast, non-cryptographic hasher for the tables a poll looks a vehicle up in (FxHash,
//! the multiply-rotate hash rustc uses for its own tables): the store writer's key and group
//! maps, and the daemon's per-vehicle tables (the fleet table's slots, the gates, the ledger).
//!
//! Why not std's SipHash: every poll looks its vehicle up a dozen times across those tables,
//! and SipHash-1-3 on a 36-byte id was ~3 % of the daemon's CPU in the fleet profile (1.2 % on
//! the store thread alone); Fx is a few multiplications per 8 bytes. Why not a crate
//! (`rustc-hash`, `ahash`): it is twenty lines and no new crate may come in for it.
//!
//! Why a non-keyed hash is acceptable here: SipHash's random key protects a map whose keys an
//! attacker chooses (HashDoS). These maps are keyed by integers of our own store
//! (`vehicles.id`), by endpoint names of our own code, and by vehicle ids that (a) come from
//! Smartcar's answers, a party carpulse authenticates and trusts with the fleet's data anyway,
//! and (b) only enter a table once the vehicle is in the store (added by its owner through
//! Connect). The tables are bounded by the fleet; the writer's per-batch maps by a batch. The
//! worst an adversarial set of ids could do is make those lookups linear in the fleet, a slower
//! poll, never a wrong row.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash's multiplier (from Firefox, as in rustc-hash 1.x).
const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// The hasher state; see the module header for why it is unkeyed.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length keeps "a\0" and "a" apart within one word.
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(t: &T) -> u64 {
        BuildHasherDefault::<FxHasher>::default().hash_one(t)
    }

    #[test]
    fn equal_keys_hash_equal_and_near_keys_apart() {
        let id = "00000001-5f2d-4a21-8343-5727e965c661";
        assert_eq!(hash(&id), hash(&id.to_owned()));
        assert_ne!(hash(&id), hash(&"00000002-5f2d-4a21-8343-5727e965c661"));
        assert_ne!(hash(&"a"), hash(&"a\0"));
        assert_ne!(hash(&(1i64, 2i64)), hash(&(2i64, 1i64)));
    }

    #[test]
    fn a_map_keyed_by_vehicle_ids_finds_every_one() {
        let mut m = FxHashMap::default();
        for i in 0..10_000i64 {
            m.insert(format!("{i:08x}-5f2d-4a21-8343-5727e965c661"), i);
        }
        for i in 0..10_000i64 {
            assert_eq!(
                m.get(&format!("{i:08x}-5f2d-4a21-8343-5727e965c661")),
                Some(&i)
            );
        }
        assert_eq!(m.len(), 10_000);
    }
}
