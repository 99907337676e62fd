//! Real-time scheduling for the HTTP API's own threads (`serve.realtime_priority`).
//!
//! On two busy cores a request that wakes a serving thread waits for the running pipeline
//! thread's time slice (1.4 ms on the development machine's kernel) before it runs. A
//! `SCHED_FIFO` thread runs as soon as it wakes. Serving threads sleep in `epoll` between
//! requests, so the pipeline is slowed by what serving costs; the kernel keeps only 5% of every
//! second for other threads (`sched_rt_runtime_us`), so clients that ask again as soon as they
//! are answered can take the rest.
//!
//! With `SCHED_RESET_ON_FORK`, threads a serving thread creates (a Kafka client's, opened for
//! a `/metrics` lag lookup) start with normal scheduling. The runtime's own threads, its
//! blocking pool included, set the priority themselves as they start.

use std::io;

use anyhow::anyhow;

/// Makes the calling thread a `SCHED_FIFO` thread of `priority` (1–99) whose new threads
/// start with normal scheduling.
#[cfg(target_os = "linux")]
pub fn set_current_thread(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    let policy = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;
    // SAFETY: `param` is a valid `sched_param` that outlives the call; pid 0 is the calling
    // thread (Linux schedules threads, not processes).
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Real-time priorities are set through Linux's scheduler only.
#[cfg(not(target_os = "linux"))]
pub fn set_current_thread(_priority: u8) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "real-time priority is supported on Linux only",
    ))
}

/// Checks, on a thread of its own, that this process's threads may run at `priority`: the
/// error names the field and how to grant it.
pub fn check(priority: u8) -> anyhow::Result<()> {
    std::thread::spawn(move || set_current_thread(priority))
        .join()
        .map_err(|_| anyhow!("the thread checking serve.realtime_priority panicked"))?
        .map_err(|e| refused(priority, e))
}

fn refused(priority: u8, e: io::Error) -> anyhow::Error {
    if e.kind() != io::ErrorKind::PermissionDenied {
        return anyhow!(
            "serve.realtime_priority: the API's threads cannot run at real-time priority {priority} ({e}); use 1 to 99 on Linux, or 0 for normal scheduling"
        );
    }
    anyhow!(
        "serve.realtime_priority: the API's threads cannot run at real-time priority {priority} ({e}); \
         grant the process CAP_SYS_NICE or a real-time priority limit of at least {priority} \
         (`ulimit -r {priority}`, systemd `LimitRTPRIO={priority}`), or set serve.realtime_priority to 0"
    )
}

/// The calling thread's scheduling policy (with `SCHED_RESET_ON_FORK` if set) and priority.
#[cfg(all(test, target_os = "linux"))]
pub fn current_thread() -> (i32, i32) {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is valid for the write.
    let policy = unsafe { libc::sched_getscheduler(0) };
    assert_eq!(unsafe { libc::sched_getparam(0, &mut param) }, 0);
    (policy, param.sched_priority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_field_and_how_to_grant_it() {
        let e = refused(10, io::Error::from_raw_os_error(1));
        let message = e.to_string();
        assert!(
            message.starts_with("serve.realtime_priority: "),
            "{message}"
        );
        assert!(message.contains("Operation not permitted"), "{message}");
        assert!(message.contains("CAP_SYS_NICE"), "{message}");
        assert!(message.contains("`ulimit -r 10`"), "{message}");
        assert!(
            message.contains("set serve.realtime_priority to 0"),
            "{message}"
        );
        // Not a missing privilege: no advice to grant one.
        let e = refused(150, io::Error::from_raw_os_error(22)).to_string();
        assert!(e.contains("use 1 to 99"), "{e}");
        assert!(!e.contains("CAP_SYS_NICE"), "{e}");
    }
}
