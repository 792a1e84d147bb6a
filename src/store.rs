//! Images on the host partition: what is there, how big, and making room for a new one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::error::Error;
use crate::fsutil;
use crate::paths::Layout;
use crate::version::Version;

/// One image file in `images/`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageFile {
    pub version: Version,
    #[serde(skip)]
    pub path: PathBuf,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes really allocated (image files are sparse).
    pub allocated: u64,
}

/// Complete image files, oldest first. Partial files (`.V.img.partial`) are not images.
pub fn list(layout: &Layout) -> Result<Vec<ImageFile>> {
    let dir = layout.images_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(Version::from_image_file_name) else {
            continue;
        };
        let md = entry.metadata()?;
        if !md.is_file() {
            continue;
        }
        images.push(ImageFile {
            version,
            path: entry.path(),
            size: md.len(),
            allocated: fsutil::allocated_bytes(&entry.path())?,
        });
    }
    images.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(images)
}

/// Path of version `v`'s image file.
pub fn image_path(layout: &Layout, v: &Version) -> PathBuf {
    layout.images_dir().join(v.image_file_name())
}

/// Path where `v`'s image is written before it is complete.
pub fn partial_path(layout: &Layout, v: &Version) -> PathBuf {
    layout
        .images_dir()
        .join(format!(".{}.partial", v.image_file_name()))
}

/// Which images a cleanup removes: everything not protected, beyond `keep_extra` of the newest
/// unprotected ones. Pure.
pub fn plan_cleanup(on_disk: &[Version], protected: &[Version], keep_extra: usize) -> Vec<Version> {
    let mut candidates: Vec<&Version> = on_disk.iter().filter(|v| !protected.contains(v)).collect();
    candidates.sort_by(|a, b| b.cmp(a));
    candidates.into_iter().skip(keep_extra).cloned().collect()
}

/// Decides whether `need` bytes fit, and which removals (in order, oldest first) would make
/// them fit. Pure: `free` is what is free now, `removable` what each removal frees.
pub fn plan_space(need: u64, free: u64, removable: &[(Version, u64)]) -> Result<Vec<Version>, u64> {
    let mut free_after = free;
    let mut chosen = Vec::new();
    let mut order: Vec<&(Version, u64)> = removable.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    for (v, bytes) in order {
        if free_after >= need {
            break;
        }
        free_after += bytes;
        chosen.push(v.clone());
    }
    if free_after >= need {
        Ok(chosen)
    } else {
        Err(free_after)
    }
}

/// Space preflight before writing an image of `image_bytes`: succeeds when it fits with the
/// margin, naming the images to remove first; fails with `NoSpace` before anything is touched.
pub fn preflight(
    layout: &Layout,
    image_bytes: u64,
    margin: u64,
    removable: &[ImageFile],
) -> Result<Vec<Version>> {
    let free = fsutil::free_bytes(layout.host())?;
    let need = image_bytes + margin;
    let removable: Vec<(Version, u64)> = removable
        .iter()
        .map(|i| (i.version.clone(), i.allocated))
        .collect();
    plan_space(need, free, &removable).map_err(|free_after| {
        Error::NoSpace {
            path: layout.host().display().to_string(),
            need,
            free: free_after,
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn cleanup_keeps_protected_and_extras() {
        let disk = [v("1.0"), v("2.0"), v("3.0"), v("4.0"), v("5.0")];
        let protected = [v("4.0"), v("5.0")];
        assert_eq!(
            plan_cleanup(&disk, &protected, 0),
            vec![v("3.0"), v("2.0"), v("1.0")]
        );
        assert_eq!(plan_cleanup(&disk, &protected, 1), vec![v("2.0"), v("1.0")]);
        assert!(plan_cleanup(&disk, &disk, 0).is_empty());
    }

    #[test]
    fn space_plan_removes_oldest_until_it_fits() {
        let removable = [(v("3.0"), 30), (v("1.0"), 10), (v("2.0"), 20)];
        assert_eq!(plan_space(50, 60, &removable), Ok(vec![]));
        assert_eq!(plan_space(50, 45, &removable), Ok(vec![v("1.0")]));
        assert_eq!(plan_space(50, 25, &removable), Ok(vec![v("1.0"), v("2.0")]));
        assert_eq!(plan_space(500, 25, &removable), Err(85));
    }
}
