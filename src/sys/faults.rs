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

/// Every fail point the code has. `tests/faults.rs` kills and fails the box verbs at each of
/// them; `prepare::*` needs ZFS and is exercised in the VM tier.
pub const POINTS: &[&str] = &[
    "init::grub-written",
    "switch::marked",
    "switch::mounted",
    "migrate::copied",
    "switch::migrated",
    "switch::closed",
    "switch::grub-written",
    "switch::state-saved",
    "switch::armed",
    "confirm::checked",
    "confirm::grub-written",
    "confirm::env-written",
    "revert::intent-saved",
    "revert::grub-written",
    "revert::env-written",
    "images::menu-written",
    "images::removed",
    "prepare::planned",
    "prepare::downloaded",
    "prepare::received",
    "prepare::exported",
    "prepare::renamed",
];
