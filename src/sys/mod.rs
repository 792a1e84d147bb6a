//! Thin effects on the system, each behind one module: running tools, durable writes, ZFS, loop
//! mounts, the lock, the clock, resource limits, the reference-compressed codec (it maps its
//! reference file).

pub mod clock;
pub mod cmd;
pub mod faults;
pub mod fsutil;
pub mod lock;
pub mod loopmount;
pub mod refcodec;
pub mod rlimit;
pub mod zfs;
