//! Load generator for bench/serve.sh: HTTP GETs (the kontext API) or Redis GETs, over
//! keep-alive TCP connections on loopback.
//!
//! ```text
//! loadgen fixed --proto http --addr 127.0.0.1:8080 --target '/v1/context/customer/C-{i}' \
//!         --ids 10000:10200 --rate 10000 --seconds 20 --warmup 2 --connections 16
//! loadgen max   --proto http ... --seconds 10 --connections 8
//! loadgen fresh --addr 127.0.0.1:8080 --target '/v1/context/customer/C-{i}' --ids 10000:10020 \
//!         --seconds 20 --connections 4
//! ```
//!
//! - `fixed` is open loop (what wrk2 does): request `n` is *scheduled* at `start + n / rate`,
//!   whether or not earlier responses came back, and its latency is measured from that scheduled
//!   time, not from when it was sent. A stalled server therefore shows up in the latency of every
//!   request that should have gone out meanwhile (no coordinated omission). Requests are spread
//!   round robin over the connections, one in flight per connection; each connection is a thread
//!   sleeping until its next scheduled time.
//! - `max` is closed loop: every connection sends its next request when the previous answer
//!   arrived; the throughput is the maximum the server sustains with that many connections.
//! - `fresh` measures freshness through the API: it polls the entities back to back and, when an
//!   entity's `events_applied` grows, records the `staleness_ms` of that first answer (server
//!   clock: now minus the newest applied event's time). That is event time to *seen by a reader*,
//!   an upper bound of event time to queryable; the error is at most one poll cycle (reported).
//!
//! One summary line per run, `key=value` pairs, latencies in microseconds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        usage("missing mode");
    };
    let opts = Opts::parse(rest);
    match mode.as_str() {
        "fixed" => fixed(&opts),
        "max" => max(&opts),
        "fresh" => fresh(&opts),
        other => usage(&format!("unknown mode {other}")),
    }
}

fn usage(why: &str) -> ! {
    eprintln!("loadgen: {why}\nusage: loadgen fixed|max|fresh --addr HOST:PORT --target TEMPLATE --ids LO:HI [--proto http|redis] [--rate N] [--seconds N] [--warmup N] [--connections N]");
    std::process::exit(2)
}

#[derive(Clone)]
struct Opts {
    proto: Proto,
    addr: String,
    /// Request path (http) or key (redis), `{i}` replaced by an id.
    target: String,
    ids: (u64, u64),
    rate: u64,
    seconds: u64,
    warmup: u64,
    connections: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Http,
    Redis,
}

impl Opts {
    fn parse(args: &[String]) -> Self {
        let mut o = Opts {
            proto: Proto::Http,
            addr: "127.0.0.1:8080".into(),
            target: "/v1/context/customer/C-{i}".into(),
            ids: (10_000, 10_200),
            rate: 10_000,
            seconds: 10,
            warmup: 2,
            connections: 16,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
            let num = |v: &str| -> u64 {
                v.parse()
                    .unwrap_or_else(|_| usage(&format!("{flag}: not a number: {v}")))
            };
            match flag.as_str() {
                "--proto" => {
                    o.proto = match value.as_str() {
                        "http" => Proto::Http,
                        "redis" => Proto::Redis,
                        v => usage(&format!("unknown protocol {v}")),
                    }
                }
                "--addr" => o.addr = value.clone(),
                "--target" => o.target = value.clone(),
                "--ids" => {
                    let (lo, hi) = value
                        .split_once(':')
                        .unwrap_or_else(|| usage("--ids LO:HI"));
                    o.ids = (num(lo), num(hi));
                    if o.ids.1 <= o.ids.0 {
                        usage("--ids: empty range");
                    }
                }
                "--rate" => o.rate = num(value).max(1),
                "--seconds" => o.seconds = num(value).max(1),
                "--warmup" => o.warmup = num(value),
                "--connections" => o.connections = num(value).max(1) as usize,
                f => usage(&format!("unknown flag {f}")),
            }
        }
        o
    }

    /// The request for the `n`-th id of the range (ids are visited in a scrambled order so
    /// consecutive requests hit different entities).
    fn request(&self, n: u64) -> Vec<u8> {
        let span = self.ids.1 - self.ids.0;
        let id = self.ids.0 + (n.wrapping_mul(7_919)) % span;
        let target = self.target.replace("{i}", &id.to_string());
        match self.proto {
            Proto::Http => format!("GET {target} HTTP/1.1\r\nHost: loadgen\r\n\r\n").into_bytes(),
            Proto::Redis => {
                format!("*2\r\n$3\r\nGET\r\n${}\r\n{}\r\n", target.len(), target).into_bytes()
            }
        }
    }
}

/// One keep-alive connection, one request in flight.
struct Conn {
    opts: Opts,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// What came back.
struct Reply {
    ok: bool,
    body: Vec<u8>,
}

impl Conn {
    fn new(opts: &Opts) -> Self {
        Self {
            opts: opts.clone(),
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends one request and reads its answer; reconnects once on a broken connection.
    fn call(&mut self, request: &[u8]) -> std::io::Result<Reply> {
        match self.try_call(request) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.stream = None;
                self.try_call(request)
            }
        }
    }

    fn try_call(&mut self, request: &[u8]) -> std::io::Result<Reply> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.opts.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(s);
        }
        let proto = self.opts.proto;
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(request)?;
        self.buf.clear();
        match proto {
            Proto::Http => read_http(stream, &mut self.buf),
            Proto::Redis => read_redis(stream, &mut self.buf),
        }
    }
}

fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// An HTTP/1.1 response with a Content-Length (what axum sends for JSON and text bodies).
fn read_http(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Reply> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        read_more(stream, buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let ok = head.starts_with("http/1.1 200");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("response without content-length"))?;
    while buf.len() < head_end + len {
        read_more(stream, buf)?;
    }
    Ok(Reply {
        ok,
        body: buf[head_end..head_end + len].to_vec(),
    })
}

/// A RESP bulk string (`$<len>\r\n<data>\r\n`) or nil (`$-1\r\n`).
fn read_redis(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Reply> {
    let line_end = loop {
        if let Some(i) = find(buf, b"\r\n") {
            break i;
        }
        read_more(stream, buf)?;
    };
    let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
    let Some(len) = line.strip_prefix('$') else {
        return Ok(Reply {
            ok: false,
            body: line.into_bytes(),
        });
    };
    let len: i64 = len
        .parse()
        .map_err(|_| std::io::Error::other("bad RESP length"))?;
    if len < 0 {
        return Ok(Reply {
            ok: false,
            body: Vec::new(),
        });
    }
    let end = line_end + 2 + len as usize + 2;
    while buf.len() < end {
        read_more(stream, buf)?;
    }
    Ok(Reply {
        ok: true,
        body: buf[line_end + 2..end - 2].to_vec(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Default)]
struct Counts {
    ok: u64,
    failed: u64,
    errors: u64,
    bytes: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.errors += other.errors;
        self.bytes += other.bytes;
    }
}

fn fixed(opts: &Opts) {
    let interval_ns = 1_000_000_000 / opts.rate;
    let total = opts.rate * (opts.warmup + opts.seconds);
    let warm = opts.rate * opts.warmup;
    // Every connection connects before the clock starts.
    let start = Instant::now() + Duration::from_millis(300);
    // A server that cannot keep up would make the run last as long as the backlog: stop
    // sending 5 s after the schedule ends and report what was never sent.
    let stop_at = start + Duration::from_secs(opts.warmup + opts.seconds + 5);
    let handles: Vec<_> = (0..opts.connections)
        .map(|c| {
            let opts = opts.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::new(&opts);
                let _ = conn.call(&opts.request(c as u64));
                let mut hist = histogram();
                let mut counts = Counts::default();
                let mut late_sends = 0u64;
                let mut unsent = 0u64;
                for n in (c as u64..total).step_by(opts.connections) {
                    let scheduled = start + Duration::from_nanos(n * interval_ns);
                    let now = Instant::now();
                    if now > stop_at {
                        unsent += 1;
                        continue;
                    }
                    if now < scheduled {
                        std::thread::sleep(scheduled - now);
                    } else if now - scheduled > Duration::from_millis(1) {
                        late_sends += 1;
                    }
                    let result = conn.call(&opts.request(n));
                    let latency = scheduled.elapsed();
                    if n < warm {
                        continue;
                    }
                    record(&mut hist, &mut counts, latency, result);
                }
                (hist, counts, late_sends, unsent)
            })
        })
        .collect();
    let mut hist = histogram();
    let mut counts = Counts::default();
    let (mut late, mut unsent) = (0, 0);
    for h in handles {
        let (h, c, l, u) = h.join().expect("load thread");
        hist.add(&h).expect("same histogram bounds");
        counts.add(&c);
        late += l;
        unsent += u;
    }
    // From the end of the warm-up to the last answer (longer than `seconds` when overloaded).
    let measured = (Instant::now() - (start + Duration::from_secs(opts.warmup))).as_secs_f64();
    println!(
        "mode=fixed proto={} target_rps={} achieved_rps={:.0} ok={} non_200={} io_errors={} late_sends={} unsent={}{} {}",
        proto_name(opts.proto),
        opts.rate,
        (counts.ok + counts.failed) as f64 / measured,
        counts.ok,
        counts.failed,
        counts.errors,
        late,
        unsent,
        if unsent > 0 { " OVERLOADED(latencies-of-sent-only)" } else { "" },
        percentiles(&hist)
    );
}

fn max(opts: &Opts) {
    let warmup = Duration::from_secs(opts.warmup);
    let run = Duration::from_secs(opts.seconds);
    let start = Instant::now();
    let handles: Vec<_> = (0..opts.connections)
        .map(|c| {
            let opts = opts.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::new(&opts);
                let mut hist = histogram();
                let mut counts = Counts::default();
                let mut n = c as u64;
                loop {
                    let sent = Instant::now();
                    if sent - start >= warmup + run {
                        break;
                    }
                    let result = conn.call(&opts.request(n));
                    n += opts.connections as u64;
                    if sent - start >= warmup {
                        record(&mut hist, &mut counts, sent.elapsed(), result);
                    }
                }
                (hist, counts)
            })
        })
        .collect();
    let mut hist = histogram();
    let mut counts = Counts::default();
    for h in handles {
        let (h, c) = h.join().expect("load thread");
        hist.add(&h).expect("same histogram bounds");
        counts.add(&c);
    }
    println!(
        "mode=max proto={} connections={} achieved_rps={:.0} MiB/s={:.1} ok={} non_200={} io_errors={} {}",
        proto_name(opts.proto),
        opts.connections,
        (counts.ok + counts.failed) as f64 / run.as_secs_f64(),
        counts.bytes as f64 / run.as_secs_f64() / (1024.0 * 1024.0),
        counts.ok,
        counts.failed,
        counts.errors,
        percentiles(&hist)
    );
}

fn fresh(opts: &Opts) {
    let span = opts.ids.1 - opts.ids.0;
    let connections = (opts.connections as u64).min(span) as usize;
    let deadline = Instant::now() + Duration::from_secs(opts.warmup + opts.seconds);
    let warm_until = Instant::now() + Duration::from_secs(opts.warmup);
    let opts = Arc::new(opts.clone());
    let handles: Vec<_> = (0..connections)
        .map(|c| {
            let opts = Arc::clone(&opts);
            std::thread::spawn(move || {
                let mut conn = Conn::new(&opts);
                // Entity ids this thread polls, and the events_applied each was last seen with.
                let ids: Vec<u64> = (opts.ids.0 + c as u64..opts.ids.1)
                    .step_by(connections)
                    .collect();
                let requests: Vec<Vec<u8>> = ids
                    .iter()
                    .map(|id| {
                        let target = opts.target.replace("{i}", &id.to_string());
                        format!("GET {target} HTTP/1.1\r\nHost: loadgen\r\n\r\n").into_bytes()
                    })
                    .collect();
                let mut seen: Vec<Option<u64>> = vec![None; ids.len()];
                let mut staleness = histogram();
                let mut cycle = histogram();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let began = Instant::now();
                    for (k, request) in requests.iter().enumerate() {
                        let Ok(reply) = conn.call(request) else {
                            errors += 1;
                            continue;
                        };
                        if !reply.ok {
                            continue;
                        }
                        let body = String::from_utf8_lossy(&reply.body);
                        let (Some(applied), Some(stale)) = (
                            json_number(&body, "\"events_applied\":"),
                            json_number(&body, "\"staleness_ms\":"),
                        ) else {
                            continue;
                        };
                        if let Some(before) = seen[k] {
                            if applied > before && Instant::now() > warm_until {
                                staleness.saturating_record((stale * 1000).max(1));
                            }
                        }
                        seen[k] = Some(applied);
                    }
                    cycle.saturating_record(began.elapsed().as_micros() as u64);
                }
                (staleness, cycle, errors)
            })
        })
        .collect();
    let mut staleness = histogram();
    let mut cycle = histogram();
    let mut errors = 0;
    for h in handles {
        let (s, c, e) = h.join().expect("poll thread");
        staleness.add(&s).expect("same histogram bounds");
        cycle.add(&c).expect("same histogram bounds");
        errors += e;
    }
    println!(
        "mode=fresh entities={span} pollers={connections} samples={} io_errors={errors} freshness: {} poll_cycle: p50_us={} p99_us={}",
        staleness.len(),
        percentiles(&staleness),
        cycle.value_at_quantile(0.5),
        cycle.value_at_quantile(0.99),
    );
}

/// The unsigned integer after `key` in a compact JSON text.
fn json_number(body: &str, key: &str) -> Option<u64> {
    let at = body.find(key)? + key.len();
    let digits: String = body[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn record(
    hist: &mut Histogram<u64>,
    counts: &mut Counts,
    latency: Duration,
    result: std::io::Result<Reply>,
) {
    hist.saturating_record((latency.as_micros() as u64).max(1));
    match result {
        Ok(r) if r.ok => {
            counts.ok += 1;
            counts.bytes += r.body.len() as u64;
        }
        Ok(_) => counts.failed += 1,
        Err(_) => counts.errors += 1,
    }
}

fn percentiles(h: &Histogram<u64>) -> String {
    format!(
        "p50_us={} p90_us={} p99_us={} p99.9_us={} max_us={}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Http => "http",
        Proto::Redis => "redis",
    }
}
