//! Named fail points between the steps of every verb, for the fault tests. Compiled to nothing
//! unless the `failpoints` feature is on (only `cargo test` turns it on). A test arms them
//! through the environment, as the `fail` crate reads it:
//! `FAILPOINTS="upgrade::migrated=return(kill)"` kills the process (SIGKILL) at that point,
//! `...=return` makes the step fail with an error, `...=sleep(ms)` stalls it.

/// Evaluates the fail point `$name`: with `return(kill)` the process is killed on the spot
/// (as a power cut or an OOM kill would), with any other `return` the enclosing function fails.
#[macro_export]
macro_rules! fail_point {
    ($name:expr) => {
        fail::fail_point!($name, |arg: Option<String>| {
            if arg.as_deref() == Some("kill") {
                $crate::sys::faults::kill_self();
            }
            Err(anyhow::anyhow!("fail point {}", $name))
        })
    };
}

/// SIGKILL to this process: nothing runs after it, no destructor, no unwinding.
pub fn kill_self() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    unreachable!("SIGKILL returned")
}

/// Every fail point the code has, for the fault sweep (`tests/faults.rs` checks each is hit).
pub const POINTS: &[&str] = &[];
