//! The wall clock, in the protocol's unit (seconds since the Unix epoch), and the local time of day
//! the maintenance window is read in.

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

static LOCAL_OFFSET: std::sync::OnceLock<Option<time::UtcOffset>> = std::sync::OnceLock::new();

/// Reads the local time zone's offset from UTC now, for `local_minute_of_day`. Call it while
/// the process has one thread (the `time` crate refuses to read it otherwise: another thread
/// could change the environment meanwhile); `run` does, first thing.
pub fn init_local_offset() {
    LOCAL_OFFSET.get_or_init(|| time::UtcOffset::current_local_offset().ok());
}

/// Minutes since local midnight now (the maintenance window's clock). The offset is the one
/// read at the start of the process (`init_local_offset`), so a DST change during one run is
/// seen by the next; when it could not be read, UTC (with a warning).
pub fn local_minute_of_day() -> u16 {
    let offset = LOCAL_OFFSET.get_or_init(|| time::UtcOffset::current_local_offset().ok());
    let offset = offset.unwrap_or_else(|| {
        tracing::warn!("the local time zone's offset is unknown; the window is read in UTC");
        time::UtcOffset::UTC
    });
    let t = time::OffsetDateTime::now_utc().to_offset(offset);
    u16::from(t.hour()) * 60 + u16::from(t.minute())
}
