//! `init`: provisioning. `images/V.img` exists on the host partition; make it the default and
//! write GRUB's files.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::grub;
use crate::appliance::images;
use crate::appliance::intent;
use crate::core::version::Version;
use crate::error::refused;

#[derive(Serialize)]
struct InitReport {
    default: Version,
    images: Vec<Version>,
}

/// Provisioning: `images/V.img` exists on the host partition; make it the default.
pub fn init(ctx: &mut Ctx, version: &Version, host_uuid: Option<String>) -> Result<()> {
    let (_lock, mut state, _) = intent::lock(ctx)?;
    let path = images::image_path(&ctx.layout, version);
    if !path.is_file() {
        return Err(refused(format!("image {} does not exist", path.display())));
    }
    state.install(version);
    grub::check_env_writable(ctx.layout.host())?;
    if host_uuid.is_some() {
        state.host_uuid = host_uuid;
    }
    std::fs::create_dir_all(ctx.layout.grub_dir())?;
    if !ctx.layout.grubenv().exists() {
        grub::update_env(&ctx.layout.grubenv(), &[])?;
    }
    images::sync_grub(ctx, &state)?;
    crate::fail_point!("init::grub-written");
    ctx.finish(&mut state, "init", Ok(()))?;
    let report = InitReport {
        default: version.clone(),
        images: images::menu(ctx, &state)?.images,
    };
    ctx.out.report(&report, |r| {
        format!("box provisioned: default image {}", r.default)
    })
}
