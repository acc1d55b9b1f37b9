//! [`SeqSet`]: an ordered set of sequence numbers that costs about 4 bytes per member.
//!
//! A queue's ready messages are almost always appended at the end (new messages have the
//! highest sequence number) and taken from the front (FIFO); a few come back into the middle
//! (released, consumer gone) and a few leave from the middle (expiry). A `BTreeSet<u64>` spends
//! 20-30 bytes per member on that, which for a 10M-message backlog is the difference between
//! fitting the memory target and not. Here members live in chunks of at most [`CHUNK`] 32-bit
//! offsets from the chunk's base, so a backlog of consecutive log indexes costs 4 bytes each,
//! and every operation stays within one chunk (bounded work) after a binary search over chunks.

use std::collections::VecDeque;

/// Members per chunk: 16 KiB of offsets, small enough that an insert or removal in the middle
/// of a chunk is a cheap shift.
const CHUNK: usize = 4096;

#[derive(Debug, Clone)]
struct Chunk {
    base: u64,
    /// Sorted offsets from `base`; never empty.
    offs: VecDeque<u32>,
}

impl Chunk {
    fn new(seq: u64) -> Chunk {
        let mut offs = VecDeque::with_capacity(CHUNK);
        offs.push_back(0);
        Chunk { base: seq, offs }
    }

    fn first(&self) -> u64 {
        self.base + self.offs.front().map_or(0, |o| u64::from(*o))
    }

    fn last(&self) -> u64 {
        self.base + self.offs.back().map_or(0, |o| u64::from(*o))
    }

    /// The offset of `seq` if it is representable in this chunk.
    fn off(&self, seq: u64) -> Option<u32> {
        seq.checked_sub(self.base)
            .and_then(|d| u32::try_from(d).ok())
    }
}

/// An ordered set of `u64`, compact when members are dense and mostly appended in order.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    chunks: VecDeque<Chunk>,
    len: usize,
}

impl PartialEq for SeqSet {
    fn eq(&self, other: &SeqSet) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for SeqSet {}

impl SeqSet {
    pub fn new() -> SeqSet {
        SeqSet::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn first(&self) -> Option<u64> {
        self.chunks.front().map(Chunk::first)
    }

    pub fn last(&self) -> Option<u64> {
        self.chunks.back().map(Chunk::last)
    }

    /// Index of the chunk whose range could hold `seq`: the last one starting at or before
    /// it (0 when `seq` is below every chunk).
    fn chunk_for(&self, seq: u64) -> usize {
        self.chunks
            .partition_point(|c| c.first() <= seq)
            .saturating_sub(1)
    }

    pub fn contains(&self, seq: u64) -> bool {
        let Some(c) = self.chunks.get(self.chunk_for(seq)) else {
            return false;
        };
        c.off(seq).is_some_and(|o| c.offs.binary_search(&o).is_ok())
    }

    /// Inserts `seq`; returns false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        // The common case: a new highest member goes at the end of the last chunk.
        if let Some(last) = self.chunks.back_mut() {
            if seq > last.last() {
                match last.off(seq) {
                    Some(o) if last.offs.len() < CHUNK => last.offs.push_back(o),
                    _ => self.chunks.push_back(Chunk::new(seq)),
                }
                self.len += 1;
                return true;
            }
        } else {
            self.chunks.push_back(Chunk::new(seq));
            self.len = 1;
            return true;
        }
        let i = self.chunk_for(seq);
        let c = &mut self.chunks[i];
        let off = match c.off(seq) {
            Some(o) => o,
            None if seq > c.base => {
                // Beyond 32-bit offsets from this chunk (so past its last member and before
                // the next chunk): a chunk of its own.
                self.chunks.insert(i + 1, Chunk::new(seq));
                self.len += 1;
                return true;
            }
            None => {
                // Below this chunk's base (only possible for the first chunk): move the base
                // down if the offsets still fit in 32 bits, else start a chunk in front.
                let shift = c.base - seq;
                let fits = u32::try_from(shift)
                    .ok()
                    .zip(c.offs.back().copied())
                    .is_some_and(|(s, top)| top.checked_add(s).is_some());
                if !fits || c.offs.len() >= CHUNK {
                    self.chunks.push_front(Chunk::new(seq));
                    self.len += 1;
                    return true;
                }
                let s = shift as u32;
                for o in c.offs.iter_mut() {
                    *o += s;
                }
                c.base = seq;
                0
            }
        };
        let pos = match c.offs.binary_search(&off) {
            Ok(_) => return false,
            Err(p) => p,
        };
        c.offs.insert(pos, off);
        self.len += 1;
        if c.offs.len() > CHUNK {
            // Split in half: the upper half becomes its own chunk with its own base.
            let upper: VecDeque<u32> = c.offs.split_off(CHUNK / 2);
            c.offs.shrink_to(CHUNK);
            let new_base = c.base + u64::from(upper.front().copied().unwrap_or(0));
            let shift = upper.front().copied().unwrap_or(0);
            let mut offs = VecDeque::with_capacity(CHUNK);
            offs.extend(upper.into_iter().map(|o| o - shift));
            self.chunks.insert(
                i + 1,
                Chunk {
                    base: new_base,
                    offs,
                },
            );
        }
        true
    }

    /// Removes `seq`; returns false if it was not there.
    pub fn remove(&mut self, seq: u64) -> bool {
        let i = self.chunk_for(seq);
        let Some(c) = self.chunks.get_mut(i) else {
            return false;
        };
        let Some(off) = c.off(seq) else {
            return false;
        };
        let Ok(pos) = c.offs.binary_search(&off) else {
            return false;
        };
        c.offs.remove(pos);
        if c.offs.is_empty() {
            self.chunks.remove(i);
        }
        self.len -= 1;
        true
    }

    pub fn pop_first(&mut self) -> Option<u64> {
        let c = self.chunks.front_mut()?;
        let off = c.offs.pop_front()?;
        let seq = c.base + u64::from(off);
        if c.offs.is_empty() {
            self.chunks.pop_front();
        }
        self.len -= 1;
        Some(seq)
    }

    /// Members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.offs.iter().map(move |o| c.base + u64::from(*o)))
    }

    /// Bytes of heap this set holds (for memory accounting in tests and metrics).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self
                .chunks
                .iter()
                .map(|c| c.offs.capacity() * 4)
                .sum::<usize>()
    }
}

impl FromIterator<u64> for SeqSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> SeqSet {
        let mut s = SeqSet::new();
        for x in iter {
            s.insert(x);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        PopFirst,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Values from a few clusters, including ones far apart (beyond 32-bit offsets).
        let val = prop_oneof![
            0u64..20_000,
            (0u64..50).prop_map(|x| x * 1_000_000_007),
            Just(u64::MAX),
            Just(0),
        ];
        prop_oneof![
            4 => val.clone().prop_map(Op::Insert),
            2 => val.prop_map(Op::Remove),
            1 => Just(Op::PopFirst),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec(op(), 0..1500)) {
            let mut s = SeqSet::new();
            let mut m = BTreeSet::new();
            for o in ops {
                match o {
                    Op::Insert(x) => prop_assert_eq!(s.insert(x), m.insert(x)),
                    Op::Remove(x) => prop_assert_eq!(s.remove(x), m.remove(&x)),
                    Op::PopFirst => prop_assert_eq!(s.pop_first(), m.pop_first()),
                }
                prop_assert_eq!(s.len(), m.len());
                prop_assert_eq!(s.first(), m.first().copied());
                prop_assert_eq!(s.last(), m.last().copied());
            }
            prop_assert!(s.iter().eq(m.iter().copied()));
            for x in m.iter() {
                prop_assert!(s.contains(*x));
            }
        }
    }

    #[test]
    fn dense_backlog_costs_about_four_bytes_each() {
        let s: SeqSet = (1..=1_000_000u64).collect();
        assert_eq!(s.len(), 1_000_000);
        let per = s.heap_bytes() as f64 / 1e6;
        assert!(per < 4.5, "{per} bytes per member");
        // Reverse insertion (returns into the middle) keeps the set correct.
        let mut r = SeqSet::new();
        for x in (0..20_000u64).rev() {
            r.insert(x * 3);
        }
        assert!(r.iter().eq((0..20_000u64).map(|x| x * 3)));
    }
}
