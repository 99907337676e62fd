//! CPU time as a criterion measurement, shared by the crates' benches (each includes this file
//! with `#[path = "../../../bench/cpu_time.rs"] mod cpu_time;`). On a machine whose cores are
//! shared, CPU time is the cost per core; wall time also counts the time spent descheduled.
#![allow(dead_code)] // Each bench uses a different clock.

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::Throughput;

/// Nanoseconds of CPU time on `clock` (`libc::CLOCK_THREAD_CPUTIME_ID` or
/// `libc::CLOCK_PROCESS_CPUTIME_ID`).
pub fn cpu_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; both CPU-time clocks exist on
    // every Linux since 2.6.12.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time on the clock `CLOCK`, in nanoseconds, as a criterion measurement.
pub struct CpuTime<const CLOCK: libc::clockid_t>;

/// CPU time of the calling thread.
pub type ThreadCpuTime = CpuTime<{ libc::CLOCK_THREAD_CPUTIME_ID }>;
/// CPU time of the whole process: every thread, background threads (fjall's, the log's) included.
pub type ProcessCpuTime = CpuTime<{ libc::CLOCK_PROCESS_CPUTIME_ID }>;
/// The measurements, as values for `Criterion::with_measurement`.
pub const THREAD_CPU_TIME: ThreadCpuTime = CpuTime;
pub const PROCESS_CPU_TIME: ProcessCpuTime = CpuTime;

impl<const CLOCK: libc::clockid_t> CpuTime<CLOCK> {
    /// Now, in nanoseconds of CPU time on this clock.
    pub fn now_ns() -> u64 {
        cpu_ns(CLOCK)
    }
}

impl<const CLOCK: libc::clockid_t> Measurement for CpuTime<CLOCK> {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        cpu_ns(CLOCK)
    }
    fn end(&self, start: u64) -> u64 {
        cpu_ns(CLOCK).saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuNanos
    }
}

/// Formats CPU nanoseconds like criterion's wall-time formatter (which is private).
struct CpuNanos;

impl ValueFormatter for CpuNanos {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns (cpu)")
        } else if typical < 1e6 {
            (1e-3, "µs (cpu)")
        } else if typical < 1e9 {
            (1e-6, "ms (cpu)")
        } else {
            (1e-9, "s (cpu)")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(
        &self,
        typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let n = match throughput {
            Throughput::Elements(n) => *n as f64,
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => *n as f64,
            _ => 1.0,
        };
        let per_second = n * 1e9 / typical;
        let (factor, unit) = if per_second < 1e3 {
            (1.0, "elem/cpu-s")
        } else if per_second < 1e6 {
            (1e-3, "Kelem/cpu-s")
        } else {
            (1e-6, "Melem/cpu-s")
        };
        values.iter_mut().for_each(|v| *v = n * 1e9 / *v * factor);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
