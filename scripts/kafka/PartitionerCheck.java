// Prints the partition Kafka's Java producer picks for each key, for kontext's partitioner
// cross-check (crates/kontext-kafka/tests/partitioner_java.rs). Run as a single-file program:
//
//   java -cp "$(scripts/kafka.sh classpath)" scripts/kafka/PartitionerCheck.java 12 7 < keys.hex
//
// Input: one key per line, hex-encoded (so that any bytes, including newlines and invalid UTF-8,
// and the empty key as an empty line, survive the trip). Output: one line per key, same order,
// with the partition for each partition count given, space-separated.

import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.nio.charset.StandardCharsets;

import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;

public class PartitionerCheck {
    public static void main(String[] args) throws Exception {
        if (args.length == 0) {
            System.err.println("usage: PartitionerCheck <partitions>... < keys.hex");
            System.exit(2);
        }
        int[] counts = new int[args.length];
        for (int i = 0; i < args.length; i++) {
            counts[i] = Integer.parseInt(args[i]);
        }
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.US_ASCII));
        BufferedWriter out = new BufferedWriter(new OutputStreamWriter(System.out, StandardCharsets.US_ASCII));
        String line;
        while ((line = in.readLine()) != null) {
            byte[] key = unhex(line);
            for (int i = 0; i < counts.length; i++) {
                if (i > 0) {
                    out.write(' ');
                }
                // The producer's own code path for a keyed record without an explicit partition.
                out.write(Integer.toString(BuiltInPartitioner.partitionForKey(key, counts[i])));
            }
            out.newLine();
        }
        out.flush();
    }

    private static byte[] unhex(String s) {
        if (s.length() % 2 != 0) {
            throw new IllegalArgumentException("odd-length hex line: " + s);
        }
        byte[] out = new byte[s.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }
}
