//! Plumbing shared by the store, the gateway and the data port: private directories, Unix
//! socket servers, threads that read lines into channels, and locks that survive a panic.

use crossbeam_channel::Receiver;
use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// `mutex.locked()` locks even a mutex that a panicking thread left poisoned: a cell that
/// panics on a helper thread must not take its engine or the kernel down with it.
pub trait Locked<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A directory only this user may enter, removed with everything in it when dropped.
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Makes `dir` (and its parents) and closes it to other users.
    pub fn create(dir: PathBuf) -> std::io::Result<PrivateDir> {
        std::fs::create_dir_all(&dir)?;
        let dir = PrivateDir(dir);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `dir` a private directory and binds Unix socket `name` in it; the socket is the
/// user's alone too. A socket an earlier process left there is replaced.
pub fn bind_private(
    dir: PathBuf,
    name: &str,
) -> std::io::Result<(PrivateDir, PathBuf, UnixListener)> {
    let dir = PrivateDir::create(dir)?;
    let socket = dir.path().join(name);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(parallax_data::socket_path::usable(&socket)?.path)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    Ok((dir, socket, listener))
}

/// A pipe (read end, write end), both closed on exec: a child is handed one by `dup2`.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds, owned below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just made for this process.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Accepts connections on `listener` for as long as `owner` lives, each served on a thread of
/// its own by `serve`.
pub fn serve_connections<T: Send + Sync + 'static>(
    listener: UnixListener,
    owner: Weak<T>,
    name: &str,
    serve: impl Fn(Arc<T>, UnixStream) + Send + Sync + Clone + 'static,
) -> std::io::Result<()> {
    let connection = format!("{name}-connection");
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            for stream in listener.incoming() {
                let Some(owner) = owner.upgrade() else { return };
                match stream {
                    Ok(stream) => {
                        let serve = serve.clone();
                        let _ = std::thread::Builder::new()
                            .name(connection.clone())
                            .spawn(move || serve(owner, stream));
                    }
                    Err(e) => tracing::warn!("{connection}: accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

/// Compares without stopping at the first difference, so timing tells nothing of a secret.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Lines read on a thread of their own: `Some(line)` each, then `None` at the end.
pub type Lines = Receiver<Option<String>>;

/// The lines `reader` gives, from a thread named `thread`, then `None` at its end.
pub fn read_lines(
    reader: impl std::io::Read + Send + 'static,
    thread: &str,
) -> std::io::Result<Lines> {
    let (lines_tx, lines) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = lines_tx.send(None);
        })?;
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_socket_deeper_than_an_address_holds_is_bound_and_reached() {
        let deep = std::env::temp_dir()
            .join(format!("parallax-ipc-test-{}", std::process::id()))
            .join("a-directory-name-long-enough".repeat(4));
        let (dir, socket, listener) = bind_private(deep, "deep.sock").unwrap();
        assert!(socket.as_os_str().len() > 108, "{}", socket.display());
        let mut client = parallax_data::socket_path::connect(&socket).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut byte = [0u8];
        served.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        // The socket is where its path says, closed to other users.
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(dir);
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("parallax-ipc-test-{}", std::process::id())),
        );
    }
}
