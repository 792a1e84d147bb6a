//! The lock, the state, and operations written as intent first. A verb that changes what GRUB
//! boots records the change in the state (`State::pending`) before it writes GRUB's files and
//! clears it after; whichever run comes next, whatever its verb, finishes an interrupted one
//! before doing anything else, so a power cut between the two writes is completed, never
//! silently undone by the next GRUB sync.

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::grub;
use crate::appliance::images;
use crate::appliance::state::{Pending, State};
use crate::sys::lock::Lock;

/// Takes the lock, loads the state and finishes an interrupted operation. Returns it, so that
/// a rerun of the same verb can report it instead of doing it twice.
pub fn lock(ctx: &Ctx) -> Result<(Lock, State, Option<Pending>)> {
    let lock = ctx.lock()?;
    let mut state = ctx.load_state()?;
    let finished = finish_pending(ctx, &mut state)?;
    Ok((lock, state, finished))
}

/// Writes GRUB's side of a pending operation and clears it.
pub fn finish_pending(ctx: &Ctx, state: &mut State) -> Result<Option<Pending>> {
    let Some(pending) = state.pending.clone() else {
        return Ok(None);
    };
    tracing::warn!("finishing an interrupted {pending:?}");
    write_grub(ctx, state, &pending)?;
    state.pending = None;
    state.save(&ctx.layout.state_file())?;
    Ok(Some(pending))
}

/// GRUB's side of `pending`, as the state (already saved) calls for.
pub fn write_grub(ctx: &Ctx, state: &State, pending: &Pending) -> Result<()> {
    match pending {
        Pending::Revert { .. } => {
            images::sync_grub(ctx, state)?;
            crate::fail_point!("revert::grub-written");
            grub::update_env(
                &ctx.layout.grubenv(),
                &[(grub::NEXT_ENTRY, None), (grub::ATTEMPTED, None)],
            )?;
            crate::fail_point!("revert::env-written");
        }
    }
    Ok(())
}
