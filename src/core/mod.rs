//! What the box and the server share, pure (no I/O but reading what the caller hands in):
//! versions, the protocol's documents and names (manifests, descriptors, box reports),
//! signatures, hashing.

pub mod fleetlock;
pub mod hashing;
pub mod manifest;
pub mod plan;
pub mod report;
pub mod sign;
pub mod tuf;
pub mod version;
