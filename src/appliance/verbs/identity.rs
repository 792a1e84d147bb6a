//! `identity`: the box's id, group and public key, for the factory to enroll it on the server
//! (`upgradectl fleet enroll --identity FILE`); creates the key at the first call.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::identity;
use crate::core::sign::public_key_string;

#[derive(Debug, Serialize)]
pub struct IdentityReport {
    pub box_id: String,
    pub group: Option<String>,
    pub public_key: String,
}

pub fn identity(ctx: &mut Ctx) -> Result<()> {
    let key = identity::load_or_create(&ctx.layout)?;
    let r = IdentityReport {
        box_id: identity::box_id(ctx)?,
        group: ctx.config.group.clone(),
        public_key: public_key_string(&key.verifying_key()),
    };
    ctx.out.report(&r, |r| {
        let group = r.group.as_deref().unwrap_or("");
        format!(
            "box_id {}\ngroup {group}\npublic_key {}",
            r.box_id, r.public_key
        )
    })
}
