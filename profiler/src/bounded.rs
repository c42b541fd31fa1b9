//! Tallies keyed by what others control (client addresses, thread names, stacks): a run may
//! last months and a client may cycle through addresses, so each keeps at most a fixed number
//! of keys. What would add one more goes into one `other` value instead, and is counted.
use std::{collections::HashMap, hash::Hash};

/// A map of at most `limit` keys, with an `other` value for the rest.
#[derive(Debug, Clone)]
pub struct BoundedMap<K, V> {
    entries: HashMap<K, V>,
    other: V,
    /// Updates that went to `other` because the map was full.
    folded: u64,
    limit: usize,
}

impl<K: Eq + Hash, V: Default> BoundedMap<K, V> {
    pub fn new(limit: usize) -> Self {
        Self {
            entries: HashMap::new(),
            other: V::default(),
            folded: 0,
            limit,
        }
    }

    /// The value of `key`: its own while there is room or it is there already, else `other`
    /// (the update is counted as folded).
    pub fn entry(&mut self, key: K) -> &mut V {
        if self.keeps(&key) {
            return self.entries.entry(key).or_default();
        }
        self.folded += 1;
        &mut self.other
    }

    /// Whether `key` has a value of its own, or would get one.
    pub fn keeps(&self, key: &K) -> bool {
        self.entries.len() < self.limit || self.entries.contains_key(key)
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// The keys with values of their own.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries
            .values()
            .chain((self.folded > 0).then_some(&self.other))
    }

    /// What the keys without room got, when there were any.
    pub fn other(&self) -> Option<&V> {
        (self.folded > 0).then_some(&self.other)
    }

    /// Updates that went to `other`.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.folded == 0
    }

    /// Empties the map, returning what it held.
    pub fn take(&mut self) -> Self {
        std::mem::replace(self, Self::new(self.limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_past_the_limit_go_to_other_and_are_counted() {
        let mut map: BoundedMap<u32, u64> = BoundedMap::new(2);
        *map.entry(1) += 10;
        *map.entry(2) += 20;
        *map.entry(3) += 30;
        *map.entry(1) += 1;
        *map.entry(4) += 40;
        assert_eq!(map.get(&1), Some(&11));
        assert_eq!(map.get(&3), None);
        assert_eq!(map.other(), Some(&70));
        assert_eq!(map.folded(), 2);
        assert_eq!(map.values().sum::<u64>(), 101, "nothing is lost");
        let taken = map.take();
        assert!(map.is_empty() && !taken.is_empty());
    }
}
