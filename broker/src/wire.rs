//! A minimal big-endian binary encoding for what the broker writes to its log and metadata:
//! fixed-width integers, LEB128 varints (snapshots, where sequence numbers are delta-encoded)
//! and length-prefixed byte strings. Every read is bounds-checked.

use std::io;

/// Reads fields from a byte slice; running out of bytes is an `InvalidData` error.
pub struct Reader<'a>(pub &'a [u8]);

fn short() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "truncated record")
}

impl Reader<'_> {
    pub fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(short());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    pub fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    pub fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "invalid utf-8"))
    }
    /// An optional u64: a presence byte, then the value.
    pub fn opt_u64(&mut self) -> io::Result<Option<u64>> {
        Ok(if self.u8()? != 0 {
            Some(self.u64()?)
        } else {
            None
        })
    }
    /// An unsigned LEB128 varint (at most 10 bytes).
    pub fn varint(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "varint too long",
        ))
    }
    /// A count of items that follow, each at least `min_item` bytes long: bounded by what
    /// is left, so a corrupt count cannot make the caller reserve unbounded memory.
    pub fn count(&mut self, min_item: usize) -> io::Result<usize> {
        let n = self.varint()?;
        if n > (self.0.len() / min_item.max(1)) as u64 {
            return Err(short());
        }
        Ok(n as usize)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

pub fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
        None => out.push(0),
    }
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_round_trip(vs in proptest::collection::vec(any::<u64>(), 0..50)) {
            let mut out = Vec::new();
            for v in &vs {
                put_varint(&mut out, *v);
            }
            let mut r = Reader(&out);
            for v in &vs {
                prop_assert_eq!(r.varint().unwrap(), *v);
            }
            prop_assert!(r.is_empty());
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut r = Reader(&b);
            while r.varint().is_ok() {}
            let mut r = Reader(&b);
            let _ = r.count(1);
        }
    }
}
