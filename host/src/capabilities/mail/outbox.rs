//! The `file://` outbox of the embedded default: each message is written as
//! `<message-id>.eml` (without the angle brackets) in one directory, ready
//! to open in a mail client or to hand to `sendmail -t` later.
//!
//! Each file is written under a dot-name, synced, then renamed into place,
//! so that a reader watching the directory never sees half a message. The
//! file keeps the `Bcc` header, since a file has no envelope to carry the
//! blind-copy recipients.

use std::io::Write;
use std::path::{Path, PathBuf};

/// An outbox directory.
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// Creates the directory when missing.
    pub fn new(dir: PathBuf) -> Result<Outbox, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create the outbox {}: {e}", dir.display()))?;
        Ok(Outbox { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a message id is written to.
    pub fn path_for(&self, message_id: &str) -> PathBuf {
        self.dir.join(format!("{}.eml", file_stem(message_id)))
    }

    /// Writes one message (write, sync, rename). Returns its path.
    pub async fn write(&self, message_id: &str, bytes: Vec<u8>) -> Result<PathBuf, String> {
        let stem = file_stem(message_id);
        let (tmp, target) = (self.dir.join(format!(".{stem}.eml.tmp")), self.dir.join(format!("{stem}.eml")));
        tokio::task::spawn_blocking(move || {
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &target)
            };
            match write() {
                Ok(()) => Ok(target),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(format!("cannot write {}: {e}", target.display()))
                }
            }
        })
        .await
        .map_err(|e| format!("outbox writer stopped: {e}"))?
    }

    /// Whether the directory is still there and is a directory.
    pub async fn ping(&self) -> Result<(), String> {
        match tokio::fs::metadata(&self.dir).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("outbox {} is not a directory", self.dir.display())),
            Err(e) => Err(format!("outbox {}: {e}", self.dir.display())),
        }
    }
}

/// The message id as a file name: no brackets, and nothing but
/// `[A-Za-z0-9._@-]` (anything else becomes `_`), so that no id can name a
/// path outside the outbox.
pub fn file_stem(message_id: &str) -> String {
    let id = message_id.trim().trim_start_matches('<').trim_end_matches('>');
    let stem: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-') { c } else { '_' })
        .collect();
    match stem.trim_start_matches('.') {
        "" => "message".to_string(),
        s => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_stay_inside_the_outbox() {
        assert_eq!(file_stem("<0193abc@example.com>"), "0193abc@example.com");
        assert_eq!(file_stem("<../../etc/passwd@x>"), "_.._etc_passwd@x");
        assert_eq!(file_stem("<a/b@[127.0.0.1]>"), "a_b@_127.0.0.1_");
        assert_eq!(file_stem("<>"), "message");
    }

    #[tokio::test]
    async fn writes_then_renames() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().join("outbox")).unwrap();
        let path = outbox.write("<m1@example.com>", b"Subject: hi\r\n\r\nbody\r\n".to_vec()).await.unwrap();
        assert_eq!(path, outbox.path_for("<m1@example.com>"));
        assert_eq!(std::fs::read(&path).unwrap(), b"Subject: hi\r\n\r\nbody\r\n");
        let names: Vec<_> = std::fs::read_dir(outbox.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        outbox.ping().await.unwrap();
    }
}
