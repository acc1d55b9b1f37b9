//! MQTT's primitive encodings: the fixed header, variable byte integers, two-byte integers,
//! UTF-8 strings and binary data, each read bounds-checked from a `Bytes` cursor.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::DecodeError;

const M: fn(&'static str) -> DecodeError = DecodeError::Malformed;

/// `(first byte, remaining length, header length)` once the fixed header is complete.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // The shortest form only: a trailing zero continuation is malformed.
            if i > 0 && b == 0 {
                return Err(M("remaining length not in its shortest form"));
            }
            return Ok(Some((first, len, 2 + i)));
        }
    }
    Err(M("remaining length longer than four bytes"))
}

/// Appends a variable byte integer (`v` at most 268,435,455).
pub fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A cursor over one packet's bytes.
pub struct Reader(pub Bytes);

impl Reader {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn remaining(&self) -> usize {
        self.0.len()
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.0.is_empty() {
            return Err(M("packet ends inside a field"));
        }
        Ok(self.0.get_u8())
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.0.len() < 2 {
            return Err(M("packet ends inside a field"));
        }
        Ok(self.0.get_u16())
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.0.len() < 4 {
            return Err(M("packet ends inside a field"));
        }
        Ok(self.0.get_u32())
    }
    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut v = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(M("variable byte integer not in its shortest form"));
                }
                return Ok(v);
            }
        }
        Err(M("variable byte integer longer than four bytes"))
    }
    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.0.len() < n {
            return Err(M("field longer than the packet"));
        }
        if n == self.0.len() {
            // The rest (a payload): taken whole, which allocates nothing.
            return Ok(std::mem::take(&mut self.0));
        }
        Ok(self.0.split_to(n))
    }
    /// Binary data: a two-byte length, then the bytes.
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    /// A UTF-8 string: well-formed, and without U+0000 (MQTT-1.5.4-1, -2).
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u16()?);
        if self.0.len() < n {
            return Err(M("field longer than the packet"));
        }
        // Copied out of the packet, then skipped: splitting a string off the packet's bytes
        // first would allocate their shared header for nothing.
        let s = std::str::from_utf8(&self.0[..n]).map_err(|_| M("string is not UTF-8"))?;
        if s.contains('\u{0}') {
            return Err(M("string contains U+0000"));
        }
        let s = s.to_owned();
        self.0.advance(n);
        Ok(s)
    }
}

pub fn put_binary(out: &mut BytesMut, b: &[u8]) {
    // Lengths above 65,535 cannot be expressed: the packet builders never make such fields
    // from anything but values that came through a decoder or were checked by the caller.
    let n = b.len().min(usize::from(u16::MAX));
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

pub fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

/// Length on the wire of binary data / a string.
pub fn binary_len(b: &[u8]) -> usize {
    2 + b.len().min(usize::from(u16::MAX))
}
