//! Files the gateway keeps for itself on disk: compiled modules (`--module-cache`), the etcd
//! snapshot and the generated admin key's hash (`--state-dir`). Whoever can write one of them
//! can run code in the gateway or take over its admin API, and the snapshot holds every secret,
//! so each lives in a folder of the gateway's user closed to everyone else (0700), is written as
//! a new 0600 file renamed into place, and is read only after its owner and mode are checked on
//! the open file that is then read, so that it cannot be swapped in between.

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What a file must be closed to before it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Neither group nor others may write it: integrity is enough (compiled modules).
    ToWriters,
    /// Neither group nor others may read or write it: it holds or guards a secret.
    ToEveryone,
}

impl Closed {
    /// The mode bits that must be clear.
    fn mask(self) -> u32 {
        match self {
            Closed::ToWriters => 0o022,
            Closed::ToEveryone => 0o077,
        }
    }
}

/// Makes sure `dir` exists, is a folder (not a link) of this process's user, and nobody else
/// may create, replace or remove files in it. It is created 0700 if missing (its parents with the
/// default mode); an existing one's mode is never changed, only checked: one an operator made
/// 0755 is accepted, since each file in it is checked on its own.
pub fn own_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a folder of uid {uid} that only it may write (chmod 700 it)",
            dir.display()
        )));
    }
    Ok(())
}

/// Reads `path` whole, in a folder [`own_dir`] accepts, if it is a regular file (not a link) of
/// this process's user, at most `max` bytes, with the bits `closed` names clear. The checks and
/// the read use one open file. A refusal does not name the file: the caller knows it.
pub fn read(path: &Path, closed: Closed, max: u64) -> io::Result<Vec<u8>> {
    if let Some(dir) = path.parent() {
        own_dir(dir)?;
    }
    let flags =
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, rustix::fs::Mode::empty())?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    let uid = rustix::process::geteuid().as_raw();
    trusted(meta.is_file(), meta.uid(), meta.mode(), uid, closed).map_err(io::Error::other)?;
    if meta.len() > max {
        return Err(io::Error::other(format!(
            "{} bytes, more than the {max} it may be",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `bytes` as `path`, in a folder [`own_dir`] accepts: to a new 0600 file beside it,
/// synced, then renamed over it, so that a reader sees the old file or the whole new one.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        own_dir(dir)?;
    }
    let staging = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&staging, path)
}

/// Whether a file with this owner and mode may be read by a process running as `uid`, or why not.
fn trusted(regular: bool, owner: u32, mode: u32, uid: u32, closed: Closed) -> Result<(), String> {
    if !regular {
        return Err("not a regular file".into());
    }
    if owner != uid {
        return Err(format!("owned by uid {owner}, not this gateway's ({uid})"));
    }
    if mode & closed.mask() != 0 {
        let what = match closed {
            Closed::ToWriters => "write",
            Closed::ToEveryone => "read or write",
        };
        return Err(format!(
            "mode {:o}, which lets group or others {what} it (chmod 600 it)",
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_the_gateways_own_closed_files_are_trusted() {
        let writers = |regular, owner, mode| trusted(regular, owner, mode, 1000, Closed::ToWriters);
        assert!(writers(true, 1000, 0o100600).is_ok());
        assert!(writers(true, 1000, 0o100644).is_ok());
        assert!(
            writers(false, 1000, 0o100600)
                .unwrap_err()
                .contains("regular")
        );
        assert!(
            writers(true, 0, 0o100600)
                .unwrap_err()
                .contains("owned by uid 0")
        );
        assert!(
            writers(true, 1001, 0o100600)
                .unwrap_err()
                .contains("owned by uid 1001")
        );
        assert!(
            writers(true, 1000, 0o100620)
                .unwrap_err()
                .contains("group or others write")
        );
        assert!(
            writers(true, 1000, 0o100602)
                .unwrap_err()
                .contains("group or others write")
        );

        let secret = |mode| trusted(true, 1000, mode, 1000, Closed::ToEveryone);
        assert!(secret(0o100600).is_ok());
        assert!(secret(0o100400).is_ok());
        assert!(secret(0o100640).unwrap_err().contains("read or write"));
        assert!(secret(0o100604).unwrap_err().contains("mode 604"));
        assert!(secret(0o100644).unwrap_err().contains("chmod 600"));
    }

    #[test]
    fn a_written_file_is_0600_in_a_new_0700_folder_and_reads_back() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("state").join("secret.json");
        write(&path, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read(&path, Closed::ToEveryone, 2).unwrap(), b"{}");
        // Written again over a file that was opened up: the new one is 0600 again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"{\"a\":1}").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(
            read(&path, Closed::ToEveryone, 2)
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
    }

    #[test]
    fn a_readable_file_a_link_or_an_open_folder_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let path = dir.join("secret.json");
        write(&path, b"{}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refusal = read(&path, Closed::ToEveryone, 64).unwrap_err().to_string();
        assert!(refusal.contains("lets group or others read"), "{refusal}");
        assert!(read(&path, Closed::ToWriters, 64).is_ok());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read(&link, Closed::ToEveryone, 64).is_err());

        // A folder others may write in: the file could have been replaced.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        let refusal = read(&path, Closed::ToEveryone, 64).unwrap_err().to_string();
        assert!(refusal.contains("that only it may write"), "{refusal}");
        assert!(write(&path, b"{}").is_err());
        // One only its owner may write in, as an operator's `mkdir` makes it, is fine.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(read(&path, Closed::ToEveryone, 64).unwrap(), b"{}");
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("state").join("secret.json");
        write(&path, b"{}").unwrap();
        if rustix::process::geteuid().as_raw() != 0 {
            // Only root can give a file away; the owner check itself is pinned above.
            return;
        }
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let refusal = read(&path, Closed::ToEveryone, 64).unwrap_err().to_string();
        assert!(refusal.contains("owned by uid 65534"), "{refusal}");
    }
}
