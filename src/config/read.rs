//! The one way a configuration file (amq2api.toml, the accounts file, the API-key file, TLS and
//! CA files) is read: a regular file only (symlinks followed), opened so that a FIFO cannot
//! block, and at most [`MAX_CONFIG_BYTES`] long, read through a cap so that no file can grow
//! memory. Every caller on the async runtime goes through `spawn_blocking`.

use nix::fcntl::OFlag;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use zeroize::Zeroizing;

/// The largest configuration file read (64 MiB): far above any real one, far below harm.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Why a configuration file was not read. The message names no path: callers add it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("it is not a regular file but {0}")]
    NotRegular(&'static str),
    #[error("it is larger than {} MiB (the limit for a configuration file)", MAX_CONFIG_BYTES >> 20)]
    TooLarge,
    #[error("it is not UTF-8 text")]
    NotUtf8,
}

/// What a non-regular file is, for the message.
fn kind(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("a special file")
    }
}

/// Reads a whole configuration file as bytes. The buffer is wiped when dropped (configuration
/// files hold secrets).
pub fn read_bytes(path: &Path) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    // A first look, so that a socket or a device is named rather than opened.
    if let Some(k) = kind(&std::fs::metadata(path)?) {
        return Err(ReadError::NotRegular(k));
    }
    // O_NONBLOCK: should the path have become a FIFO since, opening it returns at once instead of
    // waiting for a writer; the type of what was opened is checked again on the descriptor.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)?;
    let meta = file.metadata()?;
    if let Some(k) = kind(&meta) {
        return Err(ReadError::NotRegular(k));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ReadError::TooLarge);
    }
    read_capped(file, meta.len())
}

/// Reads at most one byte past the cap, whatever the file claims its length is.
fn read_capped(file: File, len_hint: u64) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(len_hint.min(MAX_CONFIG_BYTES) as usize + 1));
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(buf)
}

/// Reads a whole configuration file as UTF-8 text (wiped when dropped).
pub fn read_text(path: &Path) -> Result<Zeroizing<String>, ReadError> {
    let mut bytes = read_bytes(path)?;
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(s) => Ok(Zeroizing::new(s)),
        Err(e) => {
            // Wipe what was read before giving up on it.
            drop(Zeroizing::new(e.into_bytes()));
            Err(ReadError::NotUtf8)
        }
    }
}

/// Adds the certificates of the PEM file `path` to `roots` (trust anchors: an upstream
/// `ca_file`, a PostgreSQL `sslrootcert`); an error names what is wrong with the file.
pub fn add_pem_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = read_bytes(path).map_err(|e| e.to_string())?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    for c in certs {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_whatever_the_length_claims() {
        // /dev/zero claims length 0 and never ends: the capped read stops one byte past the cap.
        let zero = File::open("/dev/zero").unwrap();
        assert!(matches!(read_capped(zero, 0), Err(ReadError::TooLarge)));
        // And a device is refused before it is read at all.
        let e = read_bytes(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.to_string(), "it is not a regular file but a character device");
    }

    #[test]
    fn regular_files_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        std::fs::write(&p, "a = 1\n").unwrap();
        assert_eq!(read_text(&p).unwrap().as_str(), "a = 1\n");
        std::fs::write(&p, b"\xff\xfe").unwrap();
        assert!(matches!(read_text(&p), Err(ReadError::NotUtf8)));
        assert!(matches!(read_text(dir.path()), Err(ReadError::NotRegular("a directory"))));
        assert!(matches!(read_text(&dir.path().join("missing")), Err(ReadError::Io(_))));
    }
}
