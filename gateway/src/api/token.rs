//! The API bearer token: generated on first start into the data dir (mode 0600), or
//! read from a file the operator names.

use std::io::Write;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// The token could not be read or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Reading or writing the file failed.
    #[error("API token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable token.
    #[error("API token file {0} is empty or shorter than 16 characters")]
    TooShort(PathBuf),
    /// No randomness.
    #[error("no system randomness for a token: {0}")]
    Random(String),
}

/// Reads the token from `file`, creating it with a fresh random token (32 bytes, hex)
/// if it does not exist. Returns the token and whether it was just created.
pub fn load_or_create_token(file: &Path) -> Result<(String, bool), TokenError> {
    let io = |source| TokenError::Io {
        path: file.to_owned(),
        source,
    };
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.len() < 16 {
                return Err(TokenError::TooShort(file.to_owned()));
            }
            Ok((token, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = file.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut f = open_private(file).map_err(io)?;
            f.write_all(token.as_bytes()).map_err(io)?;
            f.write_all(b"\n").map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((token, true))
        }
        Err(e) => Err(io(e)),
    }
}

/// Creates `path` for writing with mode 0600 (the secret is never world-readable, not
/// even for a moment), failing if it exists.
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// Constant-time comparison, so response timing says nothing about the token.
pub fn matches(given: &str, token: &str) -> bool {
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/api-token");
        let (t1, created) = load_or_create_token(&file).unwrap();
        assert!(created);
        assert_eq!(t1.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (t2, created) = load_or_create_token(&file).unwrap();
        assert!(!created);
        assert_eq!(t1, t2);
        assert!(matches(&t1, &t2));
        assert!(!matches("nope", &t2));
        std::fs::write(&file, "short").unwrap();
        assert!(matches!(
            load_or_create_token(&file),
            Err(TokenError::TooShort(_))
        ));
    }
}
