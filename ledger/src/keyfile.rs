//! Private key files: written with mode 0600, refused if others can read them.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::note::SignerKey;

/// Writes `key` in signed-note private key text to a new file with mode 0600. Refuses to
/// overwrite an existing file.
pub fn write_private_key(path: &Path, key: &SignerKey) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.to_text().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// Reads a private key file. Fails closed if the file is readable or writable by group or
/// others (as ssh does), so a leaked permission is noticed before the key is used.
pub fn read_private_key(path: &Path) -> Result<SignerKey> {
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Invalid(
            "private key file is accessible by group or others; run chmod 600 on it".into(),
        ));
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path)?);
    Ok(SignerKey::parse(text.trim_end())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let key = SignerKey::generate("alice").unwrap();
        write_private_key(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private_key(&path).unwrap().verifier(), key.verifier());
        assert!(write_private_key(&path, &key).is_err(), "never overwrites");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_private_key(&path).is_err(), "refuses a readable key");
    }
}
