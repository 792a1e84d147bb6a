//! The box's verbs, one file each. Each takes the lock it needs, does its work through the
//! modules of `appliance`, records its outcome and reports.

pub mod cleanup;
pub mod confirm;
pub mod grub_entries;
pub mod identity;
pub mod init;
pub mod prepare;
pub mod releases;
pub mod revert;
pub mod status;
pub mod upgrade;
