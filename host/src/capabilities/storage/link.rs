//! Signed, expiring download links for `file://` storage, served by the
//! host's own HTTP listener (`GET /files/<key>?expires=<unix>&sig=<hex>`).
//!
//! `sig` is HMAC-SHA256, keyed by the link secret, over
//! `celer-file-link-v1\n<key>\n<expires>`: a link names one object until one
//! instant, and changing either (or the signature) makes it useless. The
//! secret is `storage.link_secret` when configured, else 32 random bytes
//! generated on first start and kept in `<data_dir>/link-secret` (mode 0600),
//! so links survive a restart. Several hosts serving the same directory need
//! the same secret: configure it.

use std::io::Write as _;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies download links.
pub struct LinkSigner {
    secret: Vec<u8>,
    /// `http://host:port` (no trailing slash), where `/files/…` is served.
    base_url: String,
}

/// Why a link is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// Bad signature, or a link past its expiry: 403.
    Forbidden,
    /// A well-signed link to an object that is not (or no longer) there: 404.
    NotFound,
}

impl LinkSigner {
    pub fn new(secret: Vec<u8>, base_url: &str) -> LinkSigner {
        LinkSigner { secret, base_url: base_url.trim_end_matches('/').to_string() }
    }

    /// The configured secret, else the one kept in `<data_dir>/link-secret`
    /// (created with mode 0600 on first use).
    pub fn load_secret(configured: Option<&str>, data_dir: &Path) -> std::io::Result<Vec<u8>> {
        if let Some(s) = configured.filter(|s| !s.is_empty()) {
            return Ok(s.as_bytes().to_vec());
        }
        let path = data_dir.join("link-secret");
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => return Ok(s.trim().as_bytes().to_vec()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(data_dir)?;
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let tmp = data_dir.join(format!(".link-secret.{}", std::process::id()));
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(secret.as_bytes())?;
            f.sync_all()?;
        }
        // Two hosts starting at once on one data dir: the first link wins and
        // both use it.
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                Ok(secret.into_bytes())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&tmp);
                Ok(std::fs::read_to_string(&path)?.trim().as_bytes().to_vec())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn mac(&self, key: &str, expires: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(b"celer-file-link-v1\n");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signature of `key` until `expires` (Unix seconds), as hex.
    pub fn sign(&self, key: &str, expires: u64) -> String {
        hex::encode(self.mac(key, expires).finalize().into_bytes())
    }

    /// The full URL of `key` until `expires`.
    pub fn url(&self, key: &str, expires: u64) -> String {
        format!("{}/files/{}?expires={expires}&sig={}", self.base_url, encode_path(key), self.sign(key, expires))
    }

    /// Whether `sig` signs `key` until `expires`, and `expires` is not past
    /// at `now` (Unix seconds). The comparison takes constant time.
    pub fn verify(&self, key: &str, expires: u64, sig: &str, now: u64) -> Result<(), LinkError> {
        let Ok(sig) = hex::decode(sig) else { return Err(LinkError::Forbidden) };
        self.mac(key, expires).verify_slice(&sig).map_err(|_| LinkError::Forbidden)?;
        if now > expires {
            return Err(LinkError::Forbidden);
        }
        Ok(())
    }
}

/// Percent-encodes a key for a URL path: unreserved characters and `/` stay.
pub fn encode_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A content type for a download, from the key's extension (file:// keeps
/// no metadata beside the bytes).
pub fn content_type_for(key: &str) -> &'static str {
    let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "json" => "application/json",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "csv" => "text/csv; charset=utf-8",
        "txt" | "log" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "xml" => "application/xml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_verifies_until_it_expires() {
        let s = LinkSigner::new(b"secret".to_vec(), "http://127.0.0.1:8642/");
        let sig = s.sign("exports/a b.zip", 1000);
        assert_eq!(s.verify("exports/a b.zip", 1000, &sig, 999), Ok(()));
        assert_eq!(s.verify("exports/a b.zip", 1000, &sig, 1000), Ok(()));
        assert_eq!(s.verify("exports/a b.zip", 1000, &sig, 1001), Err(LinkError::Forbidden));
        assert_eq!(s.verify("exports/a b.zip", 1001, &sig, 0), Err(LinkError::Forbidden), "expiry is signed");
        assert_eq!(s.verify("exports/other.zip", 1000, &sig, 0), Err(LinkError::Forbidden), "key is signed");
        assert_eq!(s.verify("exports/a b.zip", 1000, "zz", 0), Err(LinkError::Forbidden));
        let other = LinkSigner::new(b"other".to_vec(), "http://x");
        assert_eq!(other.verify("exports/a b.zip", 1000, &sig, 0), Err(LinkError::Forbidden), "secret matters");
        assert_eq!(
            s.url("exports/a b.zip", 1000),
            format!("http://127.0.0.1:8642/files/exports/a%20b.zip?expires=1000&sig={sig}")
        );
    }

    #[test]
    fn the_generated_secret_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tmp");
        let a = LinkSigner::load_secret(None, dir.path()).expect("generated");
        let b = LinkSigner::load_secret(None, dir.path()).expect("read back");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = std::fs::metadata(dir.path().join("link-secret")).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(LinkSigner::load_secret(Some("given"), dir.path()).expect("configured"), b"given".to_vec());
    }
}
