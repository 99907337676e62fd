//! Byte encodings of state keys and values.
//!
//! Keys must sort like the values they encode (fjall and the in-memory store order keys
//! lexicographically): signed integers are stored big-endian with the sign bit flipped, and
//! variable-length parts are length-prefixed so that one key can never be a prefix of another
//! key's part. Values use a small hand-written format rather than a serialization framework:
//! the operators decode and encode one state entry per event, and this is on the hot path.

use crate::store::StoreError;

/// `i64` as 8 bytes that sort like the number.
pub fn i64_sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

/// Inverse of [`i64_sortable`].
pub fn i64_from_sortable(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// Appends values to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty buffer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Little-endian i64.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// f64 bits.
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
        self
    }
    /// Length-prefixed bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    /// Unsigned LEB128: 1 byte below 128, at most 10.
    pub fn var_u64(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.buf.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
        self
    }
    /// Zigzag LEB128: small magnitudes of either sign take few bytes (deltas).
    pub fn var_i64(&mut self, v: i64) -> &mut Self {
        self.var_u64(((v << 1) ^ (v >> 63)) as u64)
    }
    /// Bytes prefixed by their [`Writer::var_u64`] length.
    pub fn var_bytes(&mut self, v: &[u8]) -> &mut Self {
        self.var_u64(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }
    /// Raw bytes, no prefix (key parts of fixed width, or the last part of a key).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads what [`Writer`] wrote; every read checks the length, so a corrupt state entry is a
/// [`StoreError::Corrupt`], never a panic.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(StoreError::Corrupt("state entry is truncated".into()));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Little-endian i64.
    pub fn i64(&mut self) -> Result<i64, StoreError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// f64 bits.
    pub fn f64(&mut self) -> Result<f64, StoreError> {
        Ok(f64::from_bits(self.u64()?))
    }
    /// Length-prefixed bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// What [`Writer::var_u64`] wrote.
    pub fn var_u64(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            if shift == 63 && byte > 1 {
                return Err(StoreError::Corrupt("varint overflows 64 bits".into()));
            }
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(StoreError::Corrupt("varint is too long".into()))
    }
    /// What [`Writer::var_i64`] wrote.
    pub fn var_i64(&mut self) -> Result<i64, StoreError> {
        let v = self.var_u64()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    /// What [`Writer::var_bytes`] wrote.
    pub fn var_bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = usize::try_from(self.var_u64()?)
            .map_err(|_| StoreError::Corrupt("state entry is truncated".into()))?;
        self.take(n)
    }
    /// Big-endian sortable i64 (key part).
    pub fn i64_sortable(&mut self) -> Result<i64, StoreError> {
        Ok(i64_from_sortable(self.array()?))
    }
    /// True when everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sortable_i64_orders_like_the_numbers() {
        let values = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for pair in values.windows(2) {
            assert!(i64_sortable(pair[0]) < i64_sortable(pair[1]));
            assert_eq!(i64_from_sortable(i64_sortable(pair[0])), pair[0]);
        }
    }

    #[test]
    fn truncated_entries_are_errors_not_panics() {
        let mut w = Writer::default();
        w.u64(7).bytes(b"abc");
        let bytes = w.finish();
        let mut r = Reader::new(&bytes[..bytes.len() - 1]);
        assert_eq!(r.u64().ok(), Some(7));
        assert!(r.bytes().is_err());
    }

    #[test]
    fn varints_round_trip_and_reject_truncation() {
        let values = [0, 1, -1, 63, -64, 64, 1 << 40, i64::MIN, i64::MAX];
        let mut w = Writer::default();
        for v in values {
            w.var_i64(v);
        }
        w.var_u64(u64::MAX).var_bytes(b"xyz");
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        for v in values {
            assert_eq!(r.var_i64().unwrap(), v);
        }
        assert_eq!(r.var_u64().unwrap(), u64::MAX);
        assert_eq!(r.var_bytes().unwrap(), b"xyz");
        assert!(r.is_empty());
        let mut w = Writer::default();
        w.var_bytes(b"xyz");
        let bytes = w.finish();
        assert!(Reader::new(&bytes[..3]).var_bytes().is_err());
        assert!(Reader::new(&[0x80; 11]).var_u64().is_err());
        // Bits beyond the 64th are refused, not dropped.
        let mut over = [0xff; 10];
        over[9] = 0x02;
        assert!(Reader::new(&over).var_u64().is_err());
    }
}
