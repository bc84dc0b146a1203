//! Study pseudonym secrets.
//!
//! Each study gets 32 random bytes the first time one of its extracts runs, kept in
//! `<data-dir>/secrets/` (directory 0700, files 0600, named by the SHA-256 of the study id so
//! no caller-chosen text reaches a path). A file holds the secret and an HMAC-SHA256 tag over
//! the file's name and the secret, keyed by a key derived from the ledger's signing key: a
//! flipped byte, or one study's file put in another's place, is refused (it would silently
//! change every later extract's pseudonyms). A secret is written to a temporary file, fsynced
//! and renamed into place, so a crash leaves either no secret or the whole one: pseudonyms stay
//! stable within a study for the life of the data directory. Secrets never leave the broker,
//! never reach a log or an error message, and are zeroized when dropped. A file of the earlier
//! form (the 32 bytes alone) is read once and rewritten with its tag.

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anonymizer::pseudonym::StudySecret;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Bytes in a study secret.
const SECRET_BYTES: usize = 32;
/// Bytes in a secret file: the secret, then its tag.
const FILE_BYTES: usize = SECRET_BYTES + 32;

/// What the ledger's key is derived for to authenticate the secrets (`Ledger::derived_key`).
pub const KEY_CONTEXT: &str = "consentry/study-secrets/v1";

/// What the ledger's key is derived for to commit to consent snapshots.
pub const CONSENT_COMMITMENT_CONTEXT: &str = "consentry/consent-commitment/v1";

/// What a receipt (and a query's header) records of the consent snapshot a query used: an
/// HMAC-SHA256 of the snapshot's digest under a key derived from the ledger's signing key. The
/// snapshot's digest itself is a function of the consented ids alone, so a researcher who
/// guesses ids could test it ("is subject X in?", "who revoked since?"); the commitment cannot
/// be tested without the key. The same snapshot gives the same commitment, so the operator (or
/// an auditor given the snapshot's digest and the key) can still tie a receipt to it.
pub fn consent_commitment(ledger: &ledger::Ledger, snapshot: &[u8; 32]) -> ledger::ids::Digest {
    use hmac::{KeyInit as _, Mac as _};
    let key = ledger.derived_key(CONSENT_COMMITMENT_CONTEXT);
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(&key[..]).expect("HMAC takes a key of any length");
    mac.update(snapshot);
    ledger::ids::Digest::from_bytes(mac.finalize().into_bytes().into())
}

/// The study secrets of one data directory.
pub struct Secrets {
    dir: PathBuf,
    key: Zeroizing<[u8; 32]>,
    cache: Mutex<HashMap<String, Arc<StudySecret>>>,
}

/// Why a secret is unusable. The text never holds secret bytes.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing the secrets directory failed.
    #[error("study secrets: {0}")]
    Io(#[from] std::io::Error),
    /// A secret file is readable by others or has the wrong size.
    #[error("study secret file {0}: {1}")]
    Bad(PathBuf, &'static str),
    /// The system's random source failed.
    #[error("study secrets: no randomness: {0}")]
    Random(String),
}

impl Secrets {
    /// Opens (creating, mode 0700) `<data_dir>/secrets`, whose files `key` authenticates.
    /// Refuses a directory that others can read.
    pub fn open(data_dir: &Path, key: Zeroizing<[u8; 32]>) -> Result<Secrets, SecretError> {
        let dir = data_dir.join("secrets");
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        if std::fs::metadata(&dir)?.permissions().mode() & 0o077 != 0 {
            return Err(SecretError::Bad(
                dir,
                "is accessible by group or others; run chmod 700 on it",
            ));
        }
        Ok(Secrets {
            dir,
            key,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, study: &str) -> PathBuf {
        let h = Sha256::digest(study.as_bytes());
        let name: String = h.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.secret"))
    }

    /// The study's secret, created on first use. Blocking file I/O: call it off the async
    /// threads.
    pub fn get(&self, study: &str) -> Result<Arc<StudySecret>, SecretError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(study) {
            return Ok(s.clone());
        }
        let path = self.path(study);
        let secret = match self.read(&path) {
            Ok(s) => s,
            Err(SecretError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = Zeroizing::new([0u8; SECRET_BYTES]);
                getrandom::fill(&mut bytes[..]).map_err(|e| SecretError::Random(e.to_string()))?;
                self.write(&path, &bytes)?
            }
            Err(e) => return Err(e),
        };
        let secret = Arc::new(secret);
        cache.insert(study.to_owned(), secret.clone());
        Ok(secret)
    }
}

impl Secrets {
    /// The MAC of `secret` stored at `path` (its file name binds it to its study).
    fn mac(&self, path: &Path, secret: &[u8]) -> hmac::Hmac<Sha256> {
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.key[..])
            .expect("HMAC takes a key of any length");
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"");
        mac.update(name);
        mac.update(&[0]);
        mac.update(secret);
        mac
    }

    /// Checks, without writing, the study's secret if it has one: `Ok(false)` without one.
    pub fn check(&self, study: &str) -> Result<bool, SecretError> {
        match self.parse(&self.path(study)) {
            Ok(_) => Ok(true),
            Err(SecretError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn read(&self, path: &Path) -> Result<StudySecret, SecretError> {
        let (secret, tagged) = self.parse(path)?;
        if tagged {
            return StudySecret::from_bytes(&secret[..])
                .map_err(|_| SecretError::Bad(path.to_owned(), "is not a usable secret"));
        }
        // The earlier form, without a tag: authenticated from now on.
        tracing::warn!(file = %path.display(), "a study secret without its tag was rewritten with one");
        self.write(path, &secret)
    }

    /// The secret in `path` and whether it carried its (checked) tag.
    fn parse(&self, path: &Path) -> Result<(Zeroizing<[u8; SECRET_BYTES]>, bool), SecretError> {
        let mut f = File::open(path)?;
        let meta = f.metadata()?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(SecretError::Bad(
                path.to_owned(),
                "is accessible by group or others; run chmod 600 on it",
            ));
        }
        let len = meta.len();
        if len != FILE_BYTES as u64 && len != SECRET_BYTES as u64 {
            return Err(SecretError::Bad(path.to_owned(), "has the wrong size"));
        }
        let mut bytes = Zeroizing::new([0u8; FILE_BYTES]);
        f.read_exact(&mut bytes[..len as usize])?;
        let (secret, tag) = bytes.split_at(SECRET_BYTES);
        let mut s = Zeroizing::new([0u8; SECRET_BYTES]);
        s.copy_from_slice(secret);
        if len == SECRET_BYTES as u64 {
            return Ok((s, false));
        }
        // Compared in constant time by the MAC itself.
        if hmac::Mac::verify_slice(self.mac(path, secret), tag).is_err() {
            return Err(SecretError::Bad(
                path.to_owned(),
                "is damaged or belongs to another study (its tag does not match); restore it \
                 from a backup: a new secret would change the study's pseudonyms",
            ));
        }
        Ok((s, true))
    }

    /// Writes `secret` with its tag at `path` (temporary file, fsync, rename).
    fn write(&self, path: &Path, secret: &[u8; SECRET_BYTES]) -> Result<StudySecret, SecretError> {
        let mut bytes = Zeroizing::new([0u8; FILE_BYTES]);
        bytes[..SECRET_BYTES].copy_from_slice(secret);
        bytes[SECRET_BYTES..]
            .copy_from_slice(&hmac::Mac::finalize(self.mac(path, secret)).into_bytes());
        create(&self.dir, path, &bytes[..])?;
        StudySecret::from_bytes(secret)
            .map_err(|_| SecretError::Bad(path.to_owned(), "is not a usable secret"))
    }
}

fn create(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    let tmp = path.with_extension("tmp");
    // A temporary file left by a crash holds an unused secret: replace it.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Zeroizing<[u8; 32]> {
        Zeroizing::new([7u8; 32])
    }

    fn pseudonym(s: &StudySecret) -> String {
        s.pseudonymizer().pseudonym(b"patient-1")
    }

    #[test]
    fn secrets_are_private_stable_and_per_study() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let secrets = Secrets::open(dir.path(), key()).unwrap();
            let a = secrets.get("study-a").unwrap();
            let b = secrets.get("study-b").unwrap();
            assert_ne!(pseudonym(&a), pseudonym(&b), "unlinkable across studies");
            assert_eq!(pseudonym(&a), pseudonym(&secrets.get("study-a").unwrap()));
            pseudonym(&a)
        };
        // Stable across a restart.
        let secrets = Secrets::open(dir.path(), key()).unwrap();
        assert_eq!(a, pseudonym(&secrets.get("study-a").unwrap()));
        let sdir = dir.path().join("secrets");
        assert_eq!(
            std::fs::metadata(&sdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let files: Vec<_> = std::fs::read_dir(&sdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 2);
        for f in &files {
            let meta = std::fs::metadata(f).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(meta.len(), 64);
            let name = f.file_name().unwrap().to_str().unwrap();
            assert!(!name.contains("study"), "no study id in file names");
        }
    }

    #[test]
    fn exposed_or_damaged_secrets_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::open(dir.path(), key()).unwrap();
        secrets.get("s").unwrap();
        let path = secrets.path("s");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secrets::open(dir.path(), key())
            .unwrap()
            .get("s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [0u8; 5]).unwrap();
        let err = Secrets::open(dir.path(), key())
            .unwrap()
            .get("s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong size"), "{err}");
        // Never silently replaced: the file is still the damaged one.
        assert_eq!(std::fs::read(&path).unwrap().len(), 5);
    }

    #[test]
    fn debug_output_never_shows_secret_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::open(dir.path(), key()).unwrap();
        let s = secrets.get("s").unwrap();
        let bytes = std::fs::read(secrets.path("s")).unwrap();
        let shown = format!("{s:?}");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !shown.contains(&hex) && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn damaged_or_swapped_secrets_are_refused_and_old_ones_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::open(dir.path(), key()).unwrap();
        let a = pseudonym(&secrets.get("a").unwrap());
        secrets.get("b").unwrap();
        let (pa, pb) = (secrets.path("a"), secrets.path("b"));
        let good = std::fs::read(&pa).unwrap();
        let fresh = || Secrets::open(dir.path(), key()).unwrap();
        // A flipped bit anywhere: refused, never replaced by a new secret.
        for at in [0, 17, 31, 32, 63] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&pa, &bad).unwrap();
            let err = fresh().get("a").unwrap_err().to_string();
            assert!(err.contains("tag does not match"), "{at}: {err}");
            assert_eq!(std::fs::read(&pa).unwrap(), bad, "left as it was");
        }
        // Study b's file in study a's place.
        std::fs::write(&pa, std::fs::read(&pb).unwrap()).unwrap();
        assert!(fresh().get("a").is_err());
        // Another ledger's key: refused.
        std::fs::write(&pa, &good).unwrap();
        let other = Secrets::open(dir.path(), Zeroizing::new([8u8; 32])).unwrap();
        assert!(other.get("a").is_err());
        assert_eq!(pseudonym(&fresh().get("a").unwrap()), a);
        // The earlier form (the secret alone) is read, then rewritten with its tag.
        std::fs::write(&pa, &good[..32]).unwrap();
        assert_eq!(pseudonym(&fresh().get("a").unwrap()), a);
        assert_eq!(std::fs::read(&pa).unwrap(), good);
    }
}
