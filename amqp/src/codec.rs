//! AMQP 1.0 type system: a bounds-checked decoder over a byte slice, an encoder into `BytesMut`,
//! and a generic [`Value`] for fields the hot path never looks at.
//!
//! The decoder never trusts a length or count from the wire: every size is checked against the
//! bytes that remain, and nesting is limited, so hostile input cannot allocate or recurse without
//! bound.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// Deepest nesting of compound values accepted from the wire.
pub const MAX_DEPTH: usize = 32;

pub mod code {
    pub const DESCRIBED: u8 = 0x00;
    pub const NULL: u8 = 0x40;
    pub const TRUE: u8 = 0x41;
    pub const FALSE: u8 = 0x42;
    pub const BOOL: u8 = 0x56;
    pub const UBYTE: u8 = 0x50;
    pub const USHORT: u8 = 0x60;
    pub const UINT: u8 = 0x70;
    pub const SMALLUINT: u8 = 0x52;
    pub const UINT0: u8 = 0x43;
    pub const ULONG: u8 = 0x80;
    pub const SMALLULONG: u8 = 0x53;
    pub const ULONG0: u8 = 0x44;
    pub const BYTE: u8 = 0x51;
    pub const SHORT: u8 = 0x61;
    pub const INT: u8 = 0x71;
    pub const SMALLINT: u8 = 0x54;
    pub const LONG: u8 = 0x81;
    pub const SMALLLONG: u8 = 0x55;
    pub const FLOAT: u8 = 0x72;
    pub const DOUBLE: u8 = 0x82;
    pub const DECIMAL32: u8 = 0x74;
    pub const DECIMAL64: u8 = 0x84;
    pub const DECIMAL128: u8 = 0x94;
    pub const CHAR: u8 = 0x73;
    pub const TIMESTAMP: u8 = 0x83;
    pub const UUID: u8 = 0x98;
    pub const VBIN8: u8 = 0xa0;
    pub const VBIN32: u8 = 0xb0;
    pub const STR8: u8 = 0xa1;
    pub const STR32: u8 = 0xb1;
    pub const SYM8: u8 = 0xa3;
    pub const SYM32: u8 = 0xb3;
    pub const LIST0: u8 = 0x45;
    pub const LIST8: u8 = 0xc0;
    pub const LIST32: u8 = 0xd0;
    pub const MAP8: u8 = 0xc1;
    pub const MAP32: u8 = 0xd1;
    pub const ARRAY8: u8 = 0xe0;
    pub const ARRAY32: u8 = 0xf0;
}

/// Any AMQP value. Used for rarely inspected fields (properties, filters, error info) so that
/// they can be carried and echoed without loss.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Ubyte(u8),
    Ushort(u16),
    Uint(u32),
    Ulong(u64),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Decimal32([u8; 4]),
    Decimal64([u8; 8]),
    Decimal128([u8; 16]),
    Char(u32),
    Timestamp(i64),
    Uuid([u8; 16]),
    Binary(Bytes),
    String(String),
    Symbol(String),
    List(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Array(Vec<Value>),
    Described(Box<Value>, Box<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Ubyte(v) => Some(v.into()),
            Value::Ushort(v) => Some(v.into()),
            Value::Uint(v) => Some(v.into()),
            Value::Ulong(v) => Some(v),
            _ => None,
        }
    }
    /// Symbols held either as one symbol or as an array of symbols (AMQP "multiple").
    pub fn symbols(&self) -> Vec<&str> {
        match self {
            Value::Symbol(s) => vec![s.as_str()],
            Value::Array(items) | Value::List(items) => {
                items.iter().filter_map(|v| v.as_str()).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A cursor over received bytes.
#[derive(Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder {
            buf,
            pos: 0,
            depth: 0,
        }
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn peek_u8(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// Size of a variable-width value (binary, string, symbol) for its constructor.
    fn var_len(&mut self, wide: bool) -> Result<usize, DecodeError> {
        let n = if wide {
            self.u32()? as usize
        } else {
            self.u8()? as usize
        };
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    /// Reads a compound header (size and count) and returns a decoder limited to its body.
    fn compound(&mut self, wide: bool) -> Result<(Decoder<'a>, usize), DecodeError> {
        let size = self.var_len(wide)?;
        let body = self.take(size)?;
        let mut inner = Decoder {
            buf: body,
            pos: 0,
            depth: self.depth + 1,
        };
        if inner.depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let count = if wide {
            inner.u32()? as usize
        } else {
            inner.u8()? as usize
        };
        // Every element takes at least one byte except inside arrays, checked separately.
        Ok((inner, count))
    }

    /// Reads a constructor; returns the format code and, for described types, the descriptor.
    fn constructor(&mut self) -> Result<(u8, Option<Value>), DecodeError> {
        let c = self.u8()?;
        if c == code::DESCRIBED {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            let d = self.value();
            self.depth -= 1;
            let d = d?;
            let c2 = self.u8()?;
            if c2 == code::DESCRIBED {
                return Err(DecodeError::Invalid("nested descriptor in constructor"));
            }
            Ok((c2, Some(d)))
        } else {
            Ok((c, None))
        }
    }

    /// Decodes any value.
    pub fn value(&mut self) -> Result<Value, DecodeError> {
        let (c, descriptor) = self.constructor()?;
        let v = self.value_of(c)?;
        Ok(match descriptor {
            Some(d) => Value::Described(Box::new(d), Box::new(v)),
            None => v,
        })
    }

    fn value_of(&mut self, c: u8) -> Result<Value, DecodeError> {
        use code::*;
        Ok(match c {
            NULL => Value::Null,
            TRUE => Value::Bool(true),
            FALSE => Value::Bool(false),
            BOOL => Value::Bool(self.u8()? != 0),
            UBYTE => Value::Ubyte(self.u8()?),
            USHORT => Value::Ushort(self.u16()?),
            UINT => Value::Uint(self.u32()?),
            SMALLUINT => Value::Uint(self.u8()?.into()),
            UINT0 => Value::Uint(0),
            ULONG => Value::Ulong(self.u64()?),
            SMALLULONG => Value::Ulong(self.u8()?.into()),
            ULONG0 => Value::Ulong(0),
            BYTE => Value::Byte(self.u8()? as i8),
            SHORT => Value::Short(self.u16()? as i16),
            INT => Value::Int(self.u32()? as i32),
            SMALLINT => Value::Int((self.u8()? as i8).into()),
            LONG => Value::Long(self.u64()? as i64),
            SMALLLONG => Value::Long((self.u8()? as i8).into()),
            FLOAT => Value::Float(f32::from_bits(self.u32()?)),
            DOUBLE => Value::Double(f64::from_bits(self.u64()?)),
            DECIMAL32 => Value::Decimal32(self.arr()?),
            DECIMAL64 => Value::Decimal64(self.arr()?),
            DECIMAL128 => Value::Decimal128(self.arr()?),
            CHAR => Value::Char(self.u32()?),
            TIMESTAMP => Value::Timestamp(self.u64()? as i64),
            UUID => Value::Uuid(self.arr()?),
            VBIN8 | VBIN32 => {
                let n = self.var_len(c == VBIN32)?;
                Value::Binary(Bytes::copy_from_slice(self.take(n)?))
            }
            STR8 | STR32 | SYM8 | SYM32 => {
                let n = self.var_len(c == STR32 || c == SYM32)?;
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| DecodeError::Invalid("invalid utf-8"))?
                    .to_owned();
                if c == STR8 || c == STR32 {
                    Value::String(s)
                } else {
                    Value::Symbol(s)
                }
            }
            LIST0 => Value::List(Vec::new()),
            LIST8 | LIST32 => {
                let (mut inner, count) = self.compound(c == LIST32)?;
                if count > inner.remaining() {
                    return Err(DecodeError::Invalid("list count exceeds size"));
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(inner.value()?);
                }
                Value::List(items)
            }
            MAP8 | MAP32 => {
                let (mut inner, count) = self.compound(c == MAP32)?;
                if count % 2 != 0 || count > inner.remaining() {
                    return Err(DecodeError::Invalid("bad map count"));
                }
                let mut items = Vec::with_capacity(count / 2);
                for _ in 0..count / 2 {
                    let k = inner.value()?;
                    let v = inner.value()?;
                    items.push((k, v));
                }
                Value::Map(items)
            }
            ARRAY8 | ARRAY32 => {
                let (mut inner, count) = self.compound(c == ARRAY32)?;
                // Zero-width elements (null, true, uint0...) take no bytes, so bound the count
                // by the declared size instead of the bytes left.
                if count > inner.buf.len() {
                    return Err(DecodeError::Invalid("array count exceeds size"));
                }
                let (ec, descriptor) = inner.constructor()?;
                let mut items = Vec::with_capacity(count.min(inner.remaining() + 1));
                for _ in 0..count {
                    let v = inner.value_of(ec)?;
                    items.push(match &descriptor {
                        Some(d) => Value::Described(Box::new(d.clone()), Box::new(v)),
                        None => v,
                    });
                }
                Value::Array(items)
            }
            other => return Err(DecodeError::UnknownFormatCode(other)),
        })
    }

    /// Skips one value without building it (used to walk message sections).
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        use code::*;
        let c = self.u8()?;
        let c = if c == DESCRIBED {
            // A descriptor may itself be described: bound the recursion like `constructor`.
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            let d = self.skip();
            self.depth -= 1;
            d?;
            self.u8()?
        } else {
            c
        };
        let n = match c {
            NULL | TRUE | FALSE | UINT0 | ULONG0 | LIST0 => 0,
            BOOL | UBYTE | SMALLUINT | SMALLULONG | BYTE | SMALLINT | SMALLLONG => 1,
            USHORT | SHORT => 2,
            UINT | INT | FLOAT | DECIMAL32 | CHAR => 4,
            ULONG | LONG | DOUBLE | DECIMAL64 | TIMESTAMP => 8,
            DECIMAL128 | UUID => 16,
            VBIN8 | STR8 | SYM8 | LIST8 | MAP8 | ARRAY8 => self.var_len(false)?,
            VBIN32 | STR32 | SYM32 | LIST32 | MAP32 | ARRAY32 => self.var_len(true)?,
            DESCRIBED => return Err(DecodeError::Invalid("nested descriptor")),
            other => return Err(DecodeError::UnknownFormatCode(other)),
        };
        self.take(n)?;
        Ok(())
    }

    /// Reads a described type's descriptor code (numeric form); symbolic descriptors are mapped
    /// to `None` so that callers reject them as unknown.
    pub fn descriptor(&mut self) -> Result<Option<u64>, DecodeError> {
        if self.u8()? != code::DESCRIBED {
            return Err(DecodeError::Invalid("expected described type"));
        }
        // The usual encodings first (every frame and message section passes here).
        match self.peek_u8()? {
            code::SMALLULONG => {
                self.pos += 1;
                return Ok(Some(self.u8()?.into()));
            }
            code::ULONG => {
                self.pos += 1;
                return self.u64().map(Some);
            }
            _ => {}
        }
        match self.value()? {
            Value::Ulong(d) => Ok(Some(d)),
            Value::Symbol(_) => Ok(None),
            _ => Err(DecodeError::Invalid("bad descriptor")),
        }
    }

    /// Opens a list (list0/list8/list32) and returns a field reader over it.
    pub fn list(&mut self) -> Result<ListReader<'a>, DecodeError> {
        let c = self.u8()?;
        match c {
            code::LIST0 => Ok(ListReader {
                inner: Decoder::new(&[]),
                left: 0,
            }),
            code::LIST8 | code::LIST32 => {
                let (inner, count) = self.compound(c == code::LIST32)?;
                if count > inner.remaining() {
                    return Err(DecodeError::Invalid("list count exceeds size"));
                }
                Ok(ListReader { inner, left: count })
            }
            _ => Err(DecodeError::Invalid("expected list")),
        }
    }
}

impl<'a> Decoder<'a> {
    /// The next value if it is a binary, borrowed (an error otherwise).
    pub fn binary_ref(&mut self) -> Result<&'a [u8], DecodeError> {
        let c = self.u8()?;
        match c {
            code::VBIN8 | code::VBIN32 => {
                let n = self.var_len(c == code::VBIN32)?;
                self.take(n)
            }
            _ => Err(DecodeError::Invalid("expected binary")),
        }
    }

    /// Opens a map (map8/map32): a reader over its keys and values in turn (a null reads as
    /// an empty map). Lets hot paths look for a few keys without building a [`Value`] tree.
    pub fn map(&mut self) -> Result<ListReader<'a>, DecodeError> {
        let c = self.u8()?;
        match c {
            code::NULL => Ok(ListReader {
                inner: Decoder::new(&[]),
                left: 0,
            }),
            code::MAP8 | code::MAP32 => {
                let (inner, count) = self.compound(c == code::MAP32)?;
                if count % 2 != 0 || count > inner.remaining() {
                    return Err(DecodeError::Invalid("bad map count"));
                }
                Ok(ListReader { inner, left: count })
            }
            _ => Err(DecodeError::Invalid("expected map")),
        }
    }
}

/// Reads the fields of a composite (described list) one at a time; a missing trailing field
/// reads as null.
pub struct ListReader<'a> {
    inner: Decoder<'a>,
    left: usize,
}

macro_rules! opt_field {
    ($name:ident, $t:ty, $pat:pat => $e:expr) => {
        opt_field!(@ $name, stringify!($name), $t, $pat => $e);
    };
    (@ $name:ident, $label:expr, $t:ty, $pat:pat => $e:expr) => {
        pub fn $name(&mut self) -> Result<Option<$t>, DecodeError> {
            match self.next_field()? {
                None | Some(Value::Null) => Ok(None),
                Some($pat) => Ok(Some($e)),
                Some(_) => Err(DecodeError::Invalid(concat!("wrong type for ", $label))),
            }
        }
    };
}

impl<'a> ListReader<'a> {
    /// The next field as a generic value, `None` when the list is exhausted.
    pub fn next_field(&mut self) -> Result<Option<Value>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        // Fast path for the scalar fields the hot frames carry.
        let c = self.inner.peek_u8()?;
        let v = match c {
            code::NULL => {
                self.inner.pos += 1;
                Value::Null
            }
            code::SMALLUINT => {
                self.inner.pos += 1;
                Value::Uint(self.inner.u8()?.into())
            }
            code::UINT0 => {
                self.inner.pos += 1;
                Value::Uint(0)
            }
            code::UINT => {
                self.inner.pos += 1;
                Value::Uint(self.inner.u32()?)
            }
            code::TRUE => {
                self.inner.pos += 1;
                Value::Bool(true)
            }
            code::FALSE => {
                self.inner.pos += 1;
                Value::Bool(false)
            }
            code::VBIN8 => {
                // Delivery tags: one allocation, no detour through the generic decoder.
                self.inner.pos += 1;
                let n = self.inner.var_len(false)?;
                Value::Binary(Bytes::copy_from_slice(self.inner.take(n)?))
            }
            _ => self.inner.value()?,
        };
        Ok(Some(v))
    }
    /// Fields (or map keys and values) not read yet.
    pub fn left(&self) -> usize {
        self.left
    }
    /// The next field if it is a string or symbol, borrowed; any other value (null included)
    /// is skipped and reads as `None`.
    pub fn str_ref(&mut self) -> Result<Option<&'a str>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        let c = self.inner.peek_u8()?;
        if !matches!(c, code::STR8 | code::STR32 | code::SYM8 | code::SYM32) {
            self.skip()?;
            return Ok(None);
        }
        self.left -= 1;
        self.inner.pos += 1;
        let n = self.inner.var_len(c == code::STR32 || c == code::SYM32)?;
        std::str::from_utf8(self.inner.take(n)?)
            .map(Some)
            .map_err(|_| DecodeError::Invalid("invalid utf-8"))
    }
    /// The next field if it is a binary, borrowed; any other value is skipped (`None`).
    pub fn binary_ref(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        let c = self.inner.peek_u8()?;
        if !matches!(c, code::VBIN8 | code::VBIN32) {
            self.skip()?;
            return Ok(None);
        }
        self.left -= 1;
        self.inner.pos += 1;
        let n = self.inner.var_len(c == code::VBIN32)?;
        self.inner.take(n).map(Some)
    }
    /// When the next field is a described value with a small ulong descriptor and an empty
    /// list (`accepted`, `released`: the outcomes every message carries), takes it and returns
    /// its descriptor, building no value tree; otherwise leaves it and returns `None`.
    pub fn empty_described(&mut self) -> Result<Option<u64>, DecodeError> {
        let at = self.inner.pos;
        match self.inner.buf.get(at..at + 4) {
            Some(&[code::DESCRIBED, code::SMALLULONG, d, code::LIST0]) if self.left > 0 => {
                self.inner.pos += 4;
                self.left -= 1;
                Ok(Some(u64::from(d)))
            }
            _ => Ok(None),
        }
    }

    /// Skips the next field without decoding it.
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        if self.left > 0 {
            self.left -= 1;
            self.inner.skip()?;
        }
        Ok(())
    }
    /// The next field, required: a missing or null mandatory field is a decode error.
    pub fn value(&mut self) -> Result<Option<Value>, DecodeError> {
        match self.next_field()? {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(v)),
        }
    }
    /// A `uint` field, read in place (every transfer, flow and disposition has several):
    /// no detour through [`Value`].
    pub fn uint(&mut self) -> Result<Option<u32>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        let d = &mut self.inner;
        let (v, n) = match d.peek_u8()? {
            code::NULL => (None, 1),
            code::UINT0 => (Some(0), 1),
            code::SMALLUINT => {
                let b = d.buf.get(d.pos + 1).ok_or(DecodeError::Truncated)?;
                (Some(u32::from(*b)), 2)
            }
            code::UINT => {
                let b = d
                    .buf
                    .get(d.pos + 1..d.pos + 5)
                    .ok_or(DecodeError::Truncated)?;
                (Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]])), 5)
            }
            _ => return self.uint_value(),
        };
        d.pos += n;
        self.left -= 1;
        Ok(v)
    }
    /// A `boolean` field, read in place like [`ListReader::uint`].
    pub fn boolean(&mut self) -> Result<Option<bool>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        let d = &mut self.inner;
        let v = match d.peek_u8()? {
            code::NULL => None,
            code::TRUE => Some(true),
            code::FALSE => Some(false),
            _ => return self.boolean_value(),
        };
        d.pos += 1;
        self.left -= 1;
        Ok(v)
    }
    opt_field!(@ uint_value, "uint", u32, Value::Uint(v) => v);
    opt_field!(@ boolean_value, "boolean", bool, Value::Bool(v) => v);
    opt_field!(ushort, u16, Value::Ushort(v) => v);
    opt_field!(ubyte, u8, Value::Ubyte(v) => v);
    opt_field!(ulong, u64, Value::Ulong(v) => v);
    opt_field!(string, String, Value::String(v) => v);
    opt_field!(symbol, String, Value::Symbol(v) => v);
    opt_field!(binary, Bytes, Value::Binary(v) => v);
    /// A `milliseconds`/`uint` field where some peers send other unsigned widths.
    pub fn any_uint(&mut self) -> Result<Option<u32>, DecodeError> {
        match self.next_field()? {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or(DecodeError::Invalid("expected uint")),
        }
    }
    /// Address fields are strings, but some clients send symbols.
    pub fn address(&mut self) -> Result<Option<String>, DecodeError> {
        match self.next_field()? {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) | Some(Value::Symbol(s)) => Ok(Some(s)),
            Some(_) => Err(DecodeError::Invalid("address must be a string")),
        }
    }
}

/// Writes AMQP values.
pub struct Encoder<'a> {
    pub buf: &'a mut BytesMut,
}

impl<'a> Encoder<'a> {
    pub fn new(buf: &'a mut BytesMut) -> Self {
        Encoder { buf }
    }
    pub fn null(&mut self) {
        self.buf.put_u8(code::NULL);
    }
    pub fn boolean(&mut self, v: bool) {
        self.buf.put_u8(if v { code::TRUE } else { code::FALSE });
    }
    pub fn ubyte(&mut self, v: u8) {
        self.buf.put_u8(code::UBYTE);
        self.buf.put_u8(v);
    }
    pub fn ushort(&mut self, v: u16) {
        self.buf.put_u8(code::USHORT);
        self.buf.put_u16(v);
    }
    pub fn uint(&mut self, v: u32) {
        if v == 0 {
            self.buf.put_u8(code::UINT0);
        } else if v < 256 {
            self.buf.put_u8(code::SMALLUINT);
            self.buf.put_u8(v as u8);
        } else {
            self.buf.put_u8(code::UINT);
            self.buf.put_u32(v);
        }
    }
    pub fn ulong(&mut self, v: u64) {
        if v == 0 {
            self.buf.put_u8(code::ULONG0);
        } else if v < 256 {
            self.buf.put_u8(code::SMALLULONG);
            self.buf.put_u8(v as u8);
        } else {
            self.buf.put_u8(code::ULONG);
            self.buf.put_u64(v);
        }
    }
    pub fn descriptor(&mut self, code: u64) {
        self.buf.put_u8(code::DESCRIBED);
        self.ulong(code);
    }
    fn var(&mut self, short: u8, long: u8, b: &[u8]) {
        if b.len() < 256 {
            self.buf.put_u8(short);
            self.buf.put_u8(b.len() as u8);
        } else {
            self.buf.put_u8(long);
            self.buf.put_u32(b.len() as u32);
        }
        self.buf.put_slice(b);
    }
    pub fn binary(&mut self, b: &[u8]) {
        self.var(code::VBIN8, code::VBIN32, b);
    }
    pub fn string(&mut self, s: &str) {
        self.var(code::STR8, code::STR32, s.as_bytes());
    }
    /// The string `a` followed by `b`, written without joining them first.
    pub fn string2(&mut self, a: &str, b: &str) {
        let n = a.len() + b.len();
        if n < 256 {
            self.buf.put_u8(code::STR8);
            self.buf.put_u8(n as u8);
        } else {
            self.buf.put_u8(code::STR32);
            self.buf.put_u32(n as u32);
        }
        self.buf.put_slice(a.as_bytes());
        self.buf.put_slice(b.as_bytes());
    }
    pub fn symbol(&mut self, s: &str) {
        self.var(code::SYM8, code::SYM32, s.as_bytes());
    }
    /// An array of symbols (the encoding of AMQP "multiple" symbol fields).
    pub fn symbol_array(&mut self, syms: &[&str]) {
        self.buf.put_u8(code::ARRAY32);
        let at = self.buf.len();
        self.buf.put_u32(0);
        self.buf.put_u32(syms.len() as u32);
        self.buf.put_u8(code::SYM32);
        for s in syms {
            self.buf.put_u32(s.len() as u32);
            self.buf.put_slice(s.as_bytes());
        }
        let size = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&size.to_be_bytes());
    }

    /// Starts a list whose trailing null fields are dropped when it is finished.
    pub fn list(&mut self) -> ListWriter {
        self.buf.put_u8(code::LIST32);
        let start = self.buf.len();
        self.buf.put_u32(0);
        self.buf.put_u32(0);
        ListWriter {
            start,
            count: 0,
            kept_count: 0,
            kept_end: start + 8,
        }
    }

    pub fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.null(),
            Value::Bool(b) => self.boolean(*b),
            Value::Ubyte(x) => self.ubyte(*x),
            Value::Ushort(x) => self.ushort(*x),
            Value::Uint(x) => self.uint(*x),
            Value::Ulong(x) => self.ulong(*x),
            Value::Byte(x) => {
                self.buf.put_u8(code::BYTE);
                self.buf.put_i8(*x);
            }
            Value::Short(x) => {
                self.buf.put_u8(code::SHORT);
                self.buf.put_i16(*x);
            }
            Value::Int(x) => {
                self.buf.put_u8(code::INT);
                self.buf.put_i32(*x);
            }
            Value::Long(x) => {
                self.buf.put_u8(code::LONG);
                self.buf.put_i64(*x);
            }
            Value::Float(x) => {
                self.buf.put_u8(code::FLOAT);
                self.buf.put_f32(*x);
            }
            Value::Double(x) => {
                self.buf.put_u8(code::DOUBLE);
                self.buf.put_f64(*x);
            }
            Value::Decimal32(b) => {
                self.buf.put_u8(code::DECIMAL32);
                self.buf.put_slice(b);
            }
            Value::Decimal64(b) => {
                self.buf.put_u8(code::DECIMAL64);
                self.buf.put_slice(b);
            }
            Value::Decimal128(b) => {
                self.buf.put_u8(code::DECIMAL128);
                self.buf.put_slice(b);
            }
            Value::Char(c) => {
                self.buf.put_u8(code::CHAR);
                self.buf.put_u32(*c);
            }
            Value::Timestamp(t) => {
                self.buf.put_u8(code::TIMESTAMP);
                self.buf.put_i64(*t);
            }
            Value::Uuid(u) => {
                self.buf.put_u8(code::UUID);
                self.buf.put_slice(u);
            }
            Value::Binary(b) => self.binary(b),
            Value::String(s) => self.string(s),
            Value::Symbol(s) => self.symbol(s),
            // `list0`, as it may have arrived: a list32 is a compound, one level deeper, and
            // at the depth limit that would not decode again (found by fuzzing).
            Value::List(items) if items.is_empty() => self.buf.put_u8(code::LIST0),
            Value::List(items) => {
                self.buf.put_u8(code::LIST32);
                self.compound(items.len(), |e| items.iter().for_each(|v| e.value(v)));
            }
            Value::Map(items) => {
                self.buf.put_u8(code::MAP32);
                self.compound(items.len() * 2, |e| {
                    for (k, v) in items {
                        e.value(k);
                        e.value(v);
                    }
                });
            }
            Value::Array(items) => {
                // Arrays are re-encoded element by element with each element's own
                // constructor stripped; simplest correct form is one constructor taken from
                // the first element's widest encoding.
                self.buf.put_u8(code::ARRAY32);
                let at = self.buf.len();
                self.buf.put_u32(0);
                self.buf.put_u32(items.len() as u32);
                encode_array_body(self, items);
                let size = (self.buf.len() - at - 4) as u32;
                self.buf[at..at + 4].copy_from_slice(&size.to_be_bytes());
            }
            Value::Described(d, v) => {
                self.buf.put_u8(code::DESCRIBED);
                self.value(d);
                self.value(v);
            }
        }
    }

    fn compound(&mut self, count: usize, f: impl FnOnce(&mut Encoder)) {
        let at = self.buf.len();
        self.buf.put_u32(0);
        self.buf.put_u32(count as u32);
        f(self);
        let size = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&size.to_be_bytes());
    }
}

/// Array elements share one constructor, so each element is written in the fixed wide form of
/// its type.
fn encode_array_body(e: &mut Encoder, items: &[Value]) {
    let Some(first) = items.first() else {
        e.buf.put_u8(code::NULL);
        return;
    };
    let (desc, inner_first) = match first {
        Value::Described(d, v) => (Some(d.as_ref()), v.as_ref()),
        v => (None, v),
    };
    if let Some(d) = desc {
        e.buf.put_u8(code::DESCRIBED);
        e.value(d);
    }
    let inner = |item: &'_ Value| match item {
        Value::Described(_, v) => matches!(v.as_ref(), Value::List(l) if l.is_empty()),
        v => matches!(v, Value::List(l) if l.is_empty()),
    };
    if items.iter().all(inner) {
        // Empty lists, as `list0` elements (zero width) may have arrived: `list32` ones would
        // nest one level deeper (see `Encoder::value`).
        e.buf.put_u8(code::LIST0);
        return;
    }
    let ctor = wide_code(inner_first);
    e.buf.put_u8(ctor);
    for item in items {
        let v = match item {
            Value::Described(_, v) => v.as_ref(),
            v => v,
        };
        let mut tmp = BytesMut::new();
        Encoder::new(&mut tmp).value_wide(v);
        // value_wide writes constructor + body; drop the constructor byte.
        e.buf.put_slice(&tmp[1..]);
    }
}

fn wide_code(v: &Value) -> u8 {
    match v {
        Value::Null => code::NULL,
        Value::Bool(_) => code::BOOL,
        Value::Ubyte(_) => code::UBYTE,
        Value::Ushort(_) => code::USHORT,
        Value::Uint(_) => code::UINT,
        Value::Ulong(_) => code::ULONG,
        Value::Byte(_) => code::BYTE,
        Value::Short(_) => code::SHORT,
        Value::Int(_) => code::INT,
        Value::Long(_) => code::LONG,
        Value::Float(_) => code::FLOAT,
        Value::Double(_) => code::DOUBLE,
        Value::Decimal32(_) => code::DECIMAL32,
        Value::Decimal64(_) => code::DECIMAL64,
        Value::Decimal128(_) => code::DECIMAL128,
        Value::Char(_) => code::CHAR,
        Value::Timestamp(_) => code::TIMESTAMP,
        Value::Uuid(_) => code::UUID,
        Value::Binary(_) => code::VBIN32,
        Value::String(_) => code::STR32,
        Value::Symbol(_) => code::SYM32,
        Value::List(_) => code::LIST32,
        Value::Map(_) => code::MAP32,
        Value::Array(_) => code::ARRAY32,
        Value::Described(_, v) => wide_code(v),
    }
}

impl Encoder<'_> {
    fn value_wide(&mut self, v: &Value) {
        match v {
            Value::Bool(b) => {
                self.buf.put_u8(code::BOOL);
                self.buf.put_u8(*b as u8);
            }
            Value::Uint(x) => {
                self.buf.put_u8(code::UINT);
                self.buf.put_u32(*x);
            }
            Value::Ulong(x) => {
                self.buf.put_u8(code::ULONG);
                self.buf.put_u64(*x);
            }
            Value::Int(x) => {
                self.buf.put_u8(code::INT);
                self.buf.put_i32(*x);
            }
            Value::Long(x) => {
                self.buf.put_u8(code::LONG);
                self.buf.put_i64(*x);
            }
            Value::Binary(b) => {
                self.buf.put_u8(code::VBIN32);
                self.buf.put_u32(b.len() as u32);
                self.buf.put_slice(b);
            }
            Value::String(s) => {
                self.buf.put_u8(code::STR32);
                self.buf.put_u32(s.len() as u32);
                self.buf.put_slice(s.as_bytes());
            }
            Value::Symbol(s) => {
                self.buf.put_u8(code::SYM32);
                self.buf.put_u32(s.len() as u32);
                self.buf.put_slice(s.as_bytes());
            }
            Value::List(items) => {
                self.buf.put_u8(code::LIST32);
                self.compound(items.len(), |e| items.iter().for_each(|v| e.value(v)));
            }
            // Compound and fixed-width types already use one encoding per type.
            other => self.value(other),
        }
    }
}

/// Builder state for a list being encoded; see [`Encoder::list`].
pub struct ListWriter {
    start: usize,
    count: u32,
    kept_count: u32,
    kept_end: usize,
}

impl ListWriter {
    /// Records that a field was just written; `present` is false for a null.
    pub fn field(&mut self, buf: &BytesMut, present: bool) {
        self.count += 1;
        if present {
            self.kept_count = self.count;
            self.kept_end = buf.len();
        }
    }
    pub fn null(&mut self, e: &mut Encoder) {
        e.null();
        self.field(e.buf, false);
    }
    /// Finishes the list: trailing nulls are cut and a small list is compacted to list8.
    pub fn finish(self, e: &mut Encoder) {
        let buf = &mut *e.buf;
        buf.truncate(self.kept_end);
        let body = self.kept_end - self.start - 8;
        if self.kept_count == 0 {
            buf.truncate(self.start - 1);
            buf.put_u8(code::LIST0);
        } else if body + 1 < 256 {
            buf[self.start - 1] = code::LIST8;
            buf[self.start] = (body + 1) as u8;
            buf[self.start + 1] = self.kept_count as u8;
            buf.copy_within(self.start + 8..self.kept_end, self.start + 2);
            buf.truncate(self.kept_end - 6);
        } else {
            let size = (body + 4) as u32;
            buf[self.start..self.start + 4].copy_from_slice(&size.to_be_bytes());
            buf[self.start + 4..self.start + 8].copy_from_slice(&self.kept_count.to_be_bytes());
        }
    }
}

/// Helpers to write optional list fields in one call each.
pub struct Fields<'a> {
    pub e: Encoder<'a>,
    pub l: Option<ListWriter>,
}

impl<'a> Fields<'a> {
    /// Writes `descriptor` and opens its list.
    pub fn new(buf: &'a mut BytesMut, descriptor: u64) -> Self {
        let mut e = Encoder::new(buf);
        e.descriptor(descriptor);
        let l = e.list();
        Fields { e, l: Some(l) }
    }
    fn mark(&mut self, present: bool) {
        if let Some(l) = self.l.as_mut() {
            l.field(self.e.buf, present);
        }
    }
    pub fn null(&mut self) -> &mut Self {
        self.e.null();
        self.mark(false);
        self
    }
    pub fn uint(&mut self, v: Option<u32>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.uint(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn ulong(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.ulong(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn ushort(&mut self, v: Option<u16>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.ushort(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn ubyte(&mut self, v: Option<u8>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.ubyte(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn boolean(&mut self, v: Option<bool>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.boolean(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn string(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.string(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    /// A string given in two parts (a prefix and the rest).
    pub fn string2(&mut self, a: &str, b: &str) -> &mut Self {
        self.e.string2(a, b);
        self.mark(true);
        self
    }
    pub fn symbol(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.symbol(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn binary(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(v) => {
                self.e.binary(v);
                self.mark(true)
            }
            None => return self.null(),
        }
        self
    }
    pub fn value(&mut self, v: Option<&Value>) -> &mut Self {
        match v {
            Some(Value::Null) | None => return self.null(),
            Some(v) => {
                self.e.value(v);
                self.mark(true)
            }
        }
        self
    }
    pub fn symbols(&mut self, v: &[&str]) -> &mut Self {
        if v.is_empty() {
            return self.null();
        }
        self.e.symbol_array(v);
        self.mark(true);
        self
    }
    /// Writes a nested composite through `f` as one field.
    pub fn with(&mut self, present: bool, f: impl FnOnce(&mut BytesMut)) -> &mut Self {
        if present {
            f(self.e.buf);
            self.mark(true);
        } else {
            self.null();
        }
        self
    }
    pub fn finish(mut self) {
        if let Some(l) = self.l.take() {
            l.finish(&mut self.e);
        }
    }
}
