//! The fleet side of the server: what boxes report, who may report (enrolled identities), and
//! how a release's rollout moves in waves and pauses by itself. `store` is the only module that
//! touches the database; `rollout` is pure.

pub mod control;
pub mod fleetlock;
pub mod intake;
pub mod rollout;
pub mod semaphore;
pub mod store;
pub mod verbs;
pub mod view;
