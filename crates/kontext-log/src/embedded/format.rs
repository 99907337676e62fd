//! The on-disk record frame, shared by the append path, the read path and recovery.
//!
//! ```text
//! frame  = len:u32 crc:u32 body            (little-endian; len = body length, crc = crc32c(body))
//! body   = offset:i64 timestamp_ms:i64
//!          key_len:i32 key                 (-1 = null key)
//!          value_len:i32 value             (-1 = null value)
//!          header_count:u32 header*
//! header = key_len:u32 key(utf-8) value_len:i32 value (-1 = null value)
//! ```
//!
//! Every record carries its own offset so that recovery can check density (a frame whose offset
//! is not the expected next one ends the valid prefix) and its own checksum so that a torn or
//! corrupted tail is detected record by record.

use bytes::Bytes;
use kontext_core::record::{Header, ProduceRecord};

/// Bytes before the body: the length and the checksum.
pub(crate) const FRAME_HEADER: usize = 8;
/// The smallest possible body: offset, timestamp, two null lengths, zero headers.
pub(crate) const MIN_BODY: usize = 8 + 8 + 4 + 4 + 4;

/// The size a record will take on disk, frame header included.
pub(crate) fn frame_len(record: &ProduceRecord) -> usize {
    let mut n = FRAME_HEADER + MIN_BODY;
    n += record.key.as_ref().map_or(0, |k| k.len());
    n += record.value.as_ref().map_or(0, |v| v.len());
    for h in &record.headers {
        n += 4 + h.key.len() + 4 + h.value.as_ref().map_or(0, |v| v.len());
    }
    n
}

/// Appends one frame for `record` at `offset` to `buf`. The caller has checked the size with
/// [`frame_len`], which is what makes the `as` conversions below lossless.
pub(crate) fn encode(buf: &mut Vec<u8>, offset: i64, timestamp_ms: i64, record: &ProduceRecord) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    put_nullable(buf, record.key.as_deref());
    put_nullable(buf, record.value.as_deref());
    buf.extend_from_slice(&(record.headers.len() as u32).to_le_bytes());
    for h in &record.headers {
        buf.extend_from_slice(&(h.key.len() as u32).to_le_bytes());
        buf.extend_from_slice(h.key.as_bytes());
        put_nullable(buf, h.value.as_deref());
    }
    let body_len = (buf.len() - start - FRAME_HEADER) as u32;
    let crc = crc32c::crc32c(&buf[start + FRAME_HEADER..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_nullable(buf: &mut Vec<u8>, data: Option<&[u8]>) {
    match data {
        Some(d) => {
            buf.extend_from_slice(&(d.len() as i32).to_le_bytes());
            buf.extend_from_slice(d);
        }
        None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
    }
}

/// What [`peek`] found at a position of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peek {
    /// A whole frame with a valid checksum: its offset and total length.
    Frame { offset: i64, len: usize },
    /// The buffer ends inside the frame; `needed` is the whole frame's length if known.
    Incomplete { needed: Option<usize> },
    /// Not a valid frame: a bad length or checksum.
    Invalid(&'static str),
}

/// Checks the frame that starts at `data[0]` without decoding it.
pub(crate) fn peek(data: &[u8]) -> Peek {
    if data.len() < FRAME_HEADER {
        return Peek::Incomplete { needed: None };
    }
    let body_len = read_u32(data, 0) as usize;
    if body_len < MIN_BODY {
        return Peek::Invalid("frame length below the minimum");
    }
    let len = FRAME_HEADER + body_len;
    if data.len() < len {
        return Peek::Incomplete { needed: Some(len) };
    }
    let crc = read_u32(data, 4);
    let body = &data[FRAME_HEADER..len];
    if crc32c::crc32c(body) != crc {
        return Peek::Invalid("checksum mismatch");
    }
    Peek::Frame {
        offset: read_i64(body, 0),
        len,
    }
}

/// A decoded record body; key, value and header values are slices of the read buffer, so
/// decoding allocates only for headers.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// Decodes the frame at `buf[at..at + len]`, which [`peek`] has validated. Returns `None` if the
/// body's inner lengths are inconsistent (a checksum-valid but malformed frame: corruption or
/// a bug, never a torn write).
pub(crate) fn decode(buf: &Bytes, at: usize, len: usize) -> Option<Decoded> {
    let body_start = at + FRAME_HEADER;
    let end = at + len;
    let data = buf.get(body_start..end)?;
    let mut pos = 16usize;
    let offset = read_i64(data, 0);
    let timestamp_ms = read_i64(data, 8);
    let key = take_nullable(buf, body_start, data, &mut pos)?;
    let value = take_nullable(buf, body_start, data, &mut pos)?;
    let count = read_u32(data.get(pos..pos + 4)?, 0) as usize;
    pos += 4;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let klen = read_u32(data.get(pos..pos + 4)?, 0) as usize;
        pos += 4;
        let key = std::str::from_utf8(data.get(pos..pos.checked_add(klen)?)?)
            .ok()?
            .to_owned();
        pos += klen;
        let value = take_nullable(buf, body_start, data, &mut pos)?;
        headers.push(Header { key, value });
    }
    if pos != data.len() {
        return None;
    }
    Some(Decoded {
        offset,
        timestamp_ms,
        key,
        value,
        headers,
    })
}

fn take_nullable(buf: &Bytes, base: usize, data: &[u8], pos: &mut usize) -> Option<Option<Bytes>> {
    let len = i32::from_le_bytes(data.get(*pos..*pos + 4)?.try_into().ok()?);
    *pos += 4;
    if len < 0 {
        return Some(None);
    }
    let len = len as usize;
    let end = pos.checked_add(len)?;
    if end > data.len() {
        return None;
    }
    let out = buf.slice(base + *pos..base + end);
    *pos = end;
    Some(Some(out))
}

fn read_u32(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[at..at + 4]);
    u32::from_le_bytes(b)
}

fn read_i64(data: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[at..at + 8]);
    i64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProduceRecord {
        let mut r = ProduceRecord::new("t", Some(Bytes::from_static(b"key")), None);
        r.headers.push(Header::new("h1", "v1"));
        r.headers.push(Header {
            key: "h2".into(),
            value: None,
        });
        r
    }

    #[test]
    fn encodes_and_decodes_a_record_with_null_value_and_headers() {
        let rec = sample();
        let mut buf = Vec::new();
        encode(&mut buf, 42, 1_700_000_000_000, &rec);
        assert_eq!(buf.len(), frame_len(&rec));
        let bytes = Bytes::from(buf);
        let Peek::Frame { offset, len } = peek(&bytes) else {
            panic!("not a frame")
        };
        assert_eq!((offset, len), (42, bytes.len()));
        let d = decode(&bytes, 0, len).expect("decodes");
        assert_eq!(d.offset, 42);
        assert_eq!(d.timestamp_ms, 1_700_000_000_000);
        assert_eq!(d.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(d.value, None);
        assert_eq!(d.headers, rec.headers);
    }

    #[test]
    fn detects_torn_and_corrupt_frames() {
        let mut buf = Vec::new();
        encode(&mut buf, 0, 0, &sample());
        for cut in 0..buf.len() {
            assert!(
                matches!(peek(&buf[..cut]), Peek::Incomplete { .. }),
                "cut at {cut}"
            );
        }
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert_eq!(peek(&buf), Peek::Invalid("checksum mismatch"));
        assert_eq!(
            peek(&[1, 0, 0, 0, 0, 0, 0, 0]),
            Peek::Invalid("frame length below the minimum")
        );
    }
}
