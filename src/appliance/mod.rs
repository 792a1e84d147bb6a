//! The appliance side: what runs on a box. Its context and configuration, where things live,
//! the state machine of its images, GRUB, configuration migration, health checks, status, the
//! image store with its space planner, the prepare pipeline (fetch → receive → export) and one
//! file per verb.

pub mod accounts;
pub mod bootinfo;
pub mod config;
pub mod ctx;
pub mod gate;
pub mod grub;
pub mod health;
pub mod identity;
pub mod images;
pub mod intent;
pub mod migrate;
pub mod paths;
pub mod pool;
pub mod prepare;
pub mod rebootlock;
pub mod report;
pub mod state;
pub mod status;
pub mod trust;
pub mod verbs;
pub mod window;
