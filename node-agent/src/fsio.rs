//! File access under `--root`: host paths resolved inside the root (symlinks
//! included), atomic writes that keep mode and owner, and directory
//! bookkeeping.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// An I/O failure, naming the host path it is about.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct FsError {
    /// Host path (as the node sees it, e.g. `/etc/hosts`).
    pub path: String,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

fn fs_err<'a>(path: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError {
        path: path.to_string(),
        what,
        source,
    }
}

/// Mode of files the agent creates.
pub const FILE_MODE: u32 = 0o644;
/// Mode of directories the agent creates.
pub const DIR_MODE: u32 = 0o755;

/// The host filesystem root every path is resolved under.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The root directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the host path `host` (absolute, as the node sees it) lives
    /// under the root. Symlinks are followed as the host would follow them:
    /// an absolute link target is resolved under the root, never against
    /// the agent's own filesystem, and `..` never climbs above the root.
    /// Missing trailing components are fine (the path of a file to create).
    pub fn resolve(&self, host: &str) -> Result<PathBuf, FsError> {
        let mut pending: Vec<OsString> = components(host);
        pending.reverse();
        let mut resolved = PathBuf::new(); // relative to the root
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&part);
            let full = self.dir.join(&candidate);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(FsError {
                            path: host.to_string(),
                            what: "resolving symlinks",
                            source: io::Error::other("too many levels of symbolic links"),
                        });
                    }
                    let target = fs::read_link(&full).map_err(fs_err(host, "reading symlink"))?;
                    let target = target.to_string_lossy().into_owned();
                    if target.starts_with('/') {
                        resolved = PathBuf::new();
                    }
                    let mut more = components(&target);
                    more.reverse();
                    pending.extend(more);
                }
                _ => resolved = candidate,
            }
        }
        Ok(self.dir.join(resolved))
    }

    /// File contents, `None` when it does not exist.
    pub fn read(&self, host: &str) -> Result<Option<Vec<u8>>, FsError> {
        let path = self.resolve(host)?;
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(fs_err(host, "reading")(e)),
        }
    }

    /// Permission bits of the file, `None` when it does not exist.
    pub fn mode(&self, host: &str) -> Result<Option<u32>, FsError> {
        let path = self.resolve(host)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.mode() & 0o7777)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(fs_err(host, "stat")(e)),
        }
    }

    /// Takes from the file's permission bits every one outside `allowed`;
    /// `true` when it had any. Nothing when the file does not exist.
    pub fn restrict_mode(&self, host: &str, allowed: u32) -> Result<bool, FsError> {
        let Some(mode) = self.mode(host)? else {
            return Ok(false);
        };
        if mode & !allowed == 0 {
            return Ok(false);
        }
        let path = self.resolve(host)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode & allowed))
            .map_err(fs_err(host, "restricting mode"))?;
        Ok(true)
    }

    /// Names of the entries of directory `host`, sorted; none when it does
    /// not exist.
    pub fn list_dir(&self, host: &str) -> Result<Vec<String>, FsError> {
        let path = self.resolve(host)?;
        let entries = match fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(fs_err(host, "listing")(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(fs_err(host, "listing"))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    pub fn exists(&self, host: &str) -> bool {
        self.resolve(host).is_ok_and(|p| p.exists())
    }

    pub fn is_dir(&self, host: &str) -> bool {
        self.resolve(host).is_ok_and(|p| p.is_dir())
    }

    /// Creates the directory and its missing parents (mode 0755); returns
    /// the host paths of the directories it created, outermost first.
    pub fn create_dirs(&self, host: &str) -> Result<Vec<String>, FsError> {
        let missing = self.missing_dirs(host);
        for dir in &missing {
            let path = self.resolve(dir)?;
            match fs::DirBuilder::new().mode(DIR_MODE).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
                Err(e) => return Err(fs_err(dir, "creating directory")(e)),
            }
            sync_parent(&path);
        }
        Ok(missing)
    }

    /// The directories [`Root::create_dirs`] would create, outermost first.
    pub fn missing_dirs(&self, host: &str) -> Vec<String> {
        let mut missing = Vec::new();
        let mut cur = normalize(host);
        while cur != "/" && !self.is_dir(&cur) {
            missing.push(cur.clone());
            cur = parent(&cur);
        }
        missing.reverse();
        missing
    }

    /// Replaces (or creates) the file atomically: a temp file in the same
    /// directory, fsync, rename over the target, fsync the directory. An
    /// existing file keeps its mode and owner; a new one gets `mode`.
    ///
    /// The temp file has the existing file's owner and mode (a new one's
    /// is 0600) before any byte goes in: a 0600 config.toml holding
    /// registry passwords must not be readable by everyone while it is
    /// written.
    ///
    /// Where the target is a single-file bind mount (rename fails with
    /// EBUSY, as for `/etc/hosts` inside a container) the content is
    /// written in place instead, still from a fully prepared buffer.
    pub fn write_atomic(&self, host: &str, bytes: &[u8], mode: u32) -> Result<(), FsError> {
        let path = self.resolve(host)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A file that exists but cannot be looked at is not taken for a
        // new one: its content would be written with `mode`.
        let existing = match fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(fs_err(host, "stat")(e)),
        };
        // A random name created with O_EXCL: a link planted where the temp
        // file will be is never followed, and the name cannot be guessed.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.pullthrough-tmp."))
            .rand_bytes(temp_rand_bytes())
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(&dir)
            .map_err(fs_err(host, "creating temp file"))?;
        let f = tmp.as_file_mut();
        if let Some(m) = &existing {
            // Owner first: chown clears setuid bits, chmod restores them.
            let made = f.metadata().map_err(fs_err(host, "stat temp file"))?;
            if m.uid() != made.uid() || m.gid() != made.gid() {
                std::os::unix::fs::fchown(&*f, Some(m.uid()), Some(m.gid()))
                    .map_err(fs_err(host, "keeping owner"))?;
            }
            f.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(fs_err(host, "keeping mode"))?;
            keep_label(&path, f).map_err(fs_err(host, "keeping the SELinux label"))?;
        }
        #[cfg(test)]
        temp_written_hook(f);
        f.write_all(bytes)
            .map_err(fs_err(host, "writing temp file"))?;
        #[cfg(test)]
        temp_written_hook(f);
        if existing.is_none() {
            // A new file's content is the agent's own; it may now be read
            // as the caller asks.
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(fs_err(host, "setting mode"))?;
        }
        f.sync_all().map_err(fs_err(host, "fsync"))?;
        // rename(2) replaces a link at the target itself, never its target.
        match tmp.persist(&path) {
            Ok(_) => {}
            Err(e) if e.error.raw_os_error() == Some(nix::libc::EBUSY) => {
                drop(e.file); // removes the temp file
                // O_NOFOLLOW: a link swapped in for the bind-mounted file
                // since it was resolved is refused, not written through.
                let mut f = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(fs_err(host, "opening bind-mounted file"))?;
                f.write_all(bytes)
                    .map_err(fs_err(host, "writing bind-mounted file"))?;
                f.sync_all().map_err(fs_err(host, "fsync"))?;
            }
            Err(e) => return Err(fs_err(host, "renaming into place")(e.error)),
        }
        sync_dir(&dir).map_err(fs_err(host, "fsync directory"))?;
        Ok(())
    }

    /// Removes a file (fine when already gone) and syncs its directory.
    pub fn remove_file(&self, host: &str) -> Result<(), FsError> {
        let path = self.resolve(host)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_parent(&path);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fs_err(host, "removing")(e)),
        }
    }

    /// Removes a directory if it is empty; `Ok(false)` when it is not (or
    /// is gone already).
    pub fn remove_dir_if_empty(&self, host: &str) -> Result<bool, FsError> {
        let path = self.resolve(host)?;
        match fs::read_dir(&path) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(fs_err(host, "listing")(e)),
        }
        fs::remove_dir(&path).map_err(fs_err(host, "removing directory"))?;
        sync_parent(&path);
        Ok(true)
    }
}

/// Random characters in a temp file's name.
#[cfg(not(test))]
fn temp_rand_bytes() -> usize {
    12
}

#[cfg(test)]
thread_local! {
    /// Tests set 0 to know the temp name (`.<name>.pullthrough-tmp.`) and
    /// plant a link at it.
    pub(crate) static TEMP_RAND_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(12) };
}

#[cfg(test)]
fn temp_rand_bytes() -> usize {
    TEMP_RAND_BYTES.with(std::cell::Cell::get)
}

#[cfg(test)]
thread_local! {
    /// `(mode, uid, gid)` of each temp file just before and just after
    /// its content went in, for tests to see who could read it then.
    static TEMP_WRITTEN: std::cell::RefCell<Vec<(u32, u32, u32)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
fn temp_written_hook(f: &File) {
    if let Ok(m) = f.metadata() {
        TEMP_WRITTEN.with(|w| w.borrow_mut().push((m.mode() & 0o7777, m.uid(), m.gid())));
    }
}

/// Normalized absolute host path: `/` prefixed, no `.`/empty components.
pub fn normalize(host: &str) -> String {
    let parts = components(host);
    let mut out = String::new();
    for p in parts {
        out.push('/');
        out.push_str(&p.to_string_lossy());
    }
    if out.is_empty() { "/".into() } else { out }
}

/// The parent host path (`/` for top-level entries).
pub fn parent(host: &str) -> String {
    match host.rfind('/') {
        Some(0) | None => "/".into(),
        Some(i) => host[..i].to_string(),
    }
}

/// The SELinux label xattr.
const SELINUX_LABEL: &str = "security.selinux";

/// Gives `to` the SELinux label of `from`. A new file takes its
/// directory's default label (`etc_t` in /etc), and a confined daemon
/// allowed to read only the file's own type (`net_conf_t` for /etc/hosts)
/// would lose it. Nothing to do where there is no label or no xattr support.
fn keep_label(from: &Path, to: &fs::File) -> io::Result<()> {
    use xattr::FileExt;
    let unsupported = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(nix::libc::ENOTSUP | nix::libc::ENODATA)
        )
    };
    // Not allowed to (an agent without the privilege, in a user
    // namespace): written as before, and said.
    let refused =
        |e: &io::Error| matches!(e.raw_os_error(), Some(nix::libc::EPERM | nix::libc::EACCES));
    let label = match xattr::get(from, SELINUX_LABEL) {
        Ok(Some(label)) => label,
        Ok(None) => return Ok(()),
        Err(e) if unsupported(&e) => return Ok(()),
        Err(e) if refused(&e) => {
            tracing::warn!(path = %from.display(), error = %e, "cannot read the SELinux label; the new file gets its directory's");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    match to.set_xattr(SELINUX_LABEL, &label) {
        Err(e) if unsupported(&e) => Ok(()),
        Err(e) if refused(&e) => {
            tracing::warn!(path = %from.display(), error = %e, "cannot keep the SELinux label; the new file gets its directory's");
            Ok(())
        }
        other => other,
    }
}

/// Path components of a host path, without root, `.` and empty ones.
fn components(path: &str) -> Vec<OsString> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) {
    if let Some(p) = path.parent() {
        // Best effort: the entry is already in place; a failed directory
        // fsync only weakens crash durability.
        let _ = sync_dir(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolve_keeps_symlinks_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::create_dir_all(t.path().join("real")).unwrap();
        // Absolute target: must land under the root, not the agent's /real.
        symlink("/real", t.path().join("etc/docker")).unwrap();
        assert_eq!(
            root.resolve("/etc/docker/daemon.json").unwrap(),
            t.path().join("real/daemon.json")
        );
        // `..` does not climb out.
        assert_eq!(
            root.resolve("/../../etc/hosts").unwrap(),
            t.path().join("etc/hosts")
        );
        symlink("../real/x", t.path().join("etc/rel")).unwrap();
        assert_eq!(root.resolve("/etc/rel").unwrap(), t.path().join("real/x"));
        symlink("/etc/loop", t.path().join("etc/loop")).unwrap();
        assert!(root.resolve("/etc/loop/x").is_err());
    }

    #[test]
    fn atomic_write_keeps_mode_and_leaves_no_temp_files() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        fs::create_dir_all(t.path().join("etc")).unwrap();
        let p = t.path().join("etc/hosts");
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        root.write_atomic("/etc/hosts", b"new", FILE_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        root.write_atomic("/etc/fresh", b"x", FILE_MODE).unwrap();
        assert_eq!(
            fs::metadata(t.path().join("etc/fresh")).unwrap().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(t.path().join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A 0600 file (config.toml with registry passwords) is never
    /// readable by others through its temp file: the temp file has the
    /// file's mode and owner before its content goes in, not only once it
    /// is written.
    #[test]
    fn a_private_file_is_never_readable_by_others_while_it_is_written() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        fs::create_dir_all(t.path().join("etc")).unwrap();
        let p = t.path().join("etc/config.toml");
        fs::write(&p, b"password = \"old\"").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        // Someone else's file, where the test may give it away (as root).
        let owner = (fs::metadata(t.path()).unwrap().uid() == 0).then(|| {
            std::os::unix::fs::chown(&p, Some(4242), Some(4343)).unwrap();
            (4242, 4343)
        });
        TEMP_WRITTEN.with(|w| w.borrow_mut().clear());
        root.write_atomic("/etc/config.toml", b"password = \"new\"", FILE_MODE)
            .unwrap();
        let seen = TEMP_WRITTEN.with(|w| w.borrow_mut().split_off(0));
        assert_eq!(seen.len(), 2, "{seen:?}");
        for (mode, uid, gid) in seen {
            assert_eq!(mode, 0o600, "temp file mode while written");
            if let Some(o) = owner {
                assert_eq!((uid, gid), o, "temp file owner while written");
            }
        }
        assert_eq!(fs::read(&p).unwrap(), b"password = \"new\"");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);

        // A new file: private while written, `mode` once in place.
        root.write_atomic("/etc/fresh", b"x", FILE_MODE).unwrap();
        let seen = TEMP_WRITTEN.with(|w| w.borrow_mut().split_off(0));
        assert!(seen.iter().all(|(m, _, _)| *m == 0o600), "{seen:?}");
        assert_eq!(
            fs::metadata(t.path().join("etc/fresh")).unwrap().mode() & 0o777,
            FILE_MODE
        );
    }

    /// A replaced file keeps its SELinux label (set here by hand: a
    /// kernel without SELinux stores the xattr as it is given).
    #[test]
    fn a_replaced_file_keeps_its_selinux_label() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        let hosts = t.path().join("etc/hosts");
        fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();
        let label = b"system_u:object_r:net_conf_t:s0\0";
        if let Err(e) = xattr::set(&hosts, SELINUX_LABEL, label) {
            // A file system without xattrs: nothing to keep.
            eprintln!("skipped: cannot set {SELINUX_LABEL} here: {e}");
            return;
        }
        let root = Root::new(t.path());
        root.write_atomic(
            "/etc/hosts",
            b"127.0.0.1 localhost\n10.0.0.5 quay.io\n",
            0o644,
        )
        .unwrap();
        assert_eq!(
            fs::read(&hosts).unwrap(),
            b"127.0.0.1 localhost\n10.0.0.5 quay.io\n"
        );
        assert_eq!(
            xattr::get(&hosts, SELINUX_LABEL).unwrap().as_deref(),
            Some(&label[..])
        );
    }

    /// Issue #10, point 13: the old temp name was `.<name>.pullthrough-tmp.<pid>`,
    /// opened without O_EXCL, so a link planted there by anyone who can
    /// write the directory redirected the write anywhere on the agent's
    /// own filesystem. The name is random now, so the test makes it known
    /// (no random part) and plants links at exactly that name, one to a
    /// victim file and one dangling: O_EXCL refuses both, and nothing is
    /// written through either.
    #[test]
    fn planted_temp_links_are_never_written_through() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let root = Root::new(t.path());
        let etc = t.path().join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("hosts"), b"old").unwrap();
        let to_victim = etc.join(".hosts.pullthrough-tmp.");
        symlink(&victim, &to_victim).unwrap();
        let dangling = outside.path().join("created-through-a-link");
        let to_dangling = etc.join(".fresh.pullthrough-tmp.");
        symlink(&dangling, &to_dangling).unwrap();

        TEMP_RAND_BYTES.with(|n| n.set(0));
        for (host, link) in [("/etc/hosts", &to_victim), ("/etc/fresh", &to_dangling)] {
            let e = root.write_atomic(host, b"new", FILE_MODE).unwrap_err();
            assert_eq!((e.path.as_str(), e.what), (host, "creating temp file"));
            assert_eq!(e.source.kind(), io::ErrorKind::AlreadyExists, "{e}");
            assert!(fs::symlink_metadata(link).unwrap().is_symlink());
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!dangling.exists());
        assert_eq!(fs::read(etc.join("hosts")).unwrap(), b"old");
        assert!(!etc.join("fresh").exists());

        // With random names the links are simply not in the way.
        TEMP_RAND_BYTES.with(|n| n.set(12));
        root.write_atomic("/etc/hosts", b"new", FILE_MODE).unwrap();
        root.write_atomic("/etc/fresh", b"x", FILE_MODE).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!dangling.exists());
        assert_eq!(fs::read(etc.join("hosts")).unwrap(), b"new");
        assert_eq!(fs::read(etc.join("fresh")).unwrap(), b"x");
    }

    /// A target that is a link to an absolute path is followed inside the
    /// root (as the host would see it), never to the same path in the
    /// agent's own filesystem.
    #[test]
    fn a_linked_target_is_written_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let root = Root::new(t.path());
        fs::create_dir_all(t.path().join("etc")).unwrap();
        symlink(&victim, t.path().join("etc/daemon.json")).unwrap();
        // The link's target does not exist under the root: a clear error
        // naming the host path, and nothing written outside.
        let e = root
            .write_atomic("/etc/daemon.json", b"{}", FILE_MODE)
            .unwrap_err();
        assert_eq!(e.path, "/etc/daemon.json");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // Once it does, that is the file written.
        let inside = t.path().join(victim.strip_prefix("/").unwrap());
        fs::create_dir_all(inside.parent().unwrap()).unwrap();
        root.write_atomic("/etc/daemon.json", b"{}", FILE_MODE)
            .unwrap();
        assert_eq!(fs::read(&inside).unwrap(), b"{}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(
            fs::symlink_metadata(t.path().join("etc/daemon.json"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn create_dirs_reports_what_it_made() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        fs::create_dir_all(t.path().join("etc")).unwrap();
        let made = root.create_dirs("/etc/docker/certs.d/quay.io").unwrap();
        assert_eq!(
            made,
            [
                "/etc/docker",
                "/etc/docker/certs.d",
                "/etc/docker/certs.d/quay.io"
            ]
        );
        assert!(root.create_dirs("/etc/docker/certs.d").unwrap().is_empty());
        assert!(!root.remove_dir_if_empty("/etc/docker").unwrap());
        assert!(
            root.remove_dir_if_empty("/etc/docker/certs.d/quay.io")
                .unwrap()
        );
    }
}
