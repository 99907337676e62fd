//! Key partitioning identical to Kafka's Java client.
//!
//! The Java producer's default partitioner (`BuiltInPartitioner.partitionForKey`) computes
//! `toPositive(murmur2(keyBytes)) % numPartitions`. Both kontext backends use this function so
//! that events for one entity written by kontext and by any Java producer (Debezium, Kafka
//! Connect) land in the same partition. `tests/partitioner_java.rs` checks it against the Java
//! client itself.

/// Kafka's murmur2 (the variant in `org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    // Java sign-extends nothing here: it masks each byte with 0xff.
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's Java client picks for a non-null key.
///
/// # Panics
/// If `partitions` is not positive; topics always have at least one partition.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    // Utils.toPositive: clear the sign bit (not abs, which differs for i32::MIN).
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn matches_kafka_utils_test_vectors() {
        let cases: &[(&str, i32)] = &[
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), *expected, "murmur2({input:?})");
        }
        assert_eq!(murmur2(b"abc"), 479470107);
    }

    #[test]
    fn partition_is_always_in_range() {
        for i in 0..10_000 {
            let key = format!("customer-{i}");
            let p = partition_for_key(key.as_bytes(), 12);
            assert!((0..12).contains(&p));
        }
    }
}
