//! Object storage, limited to the key prefixes in `grants.storage`.
//!
//! The WIT `storage` interface ([`create`] for streamed uploads through a
//! [`Writer`], [`get`], [`delete`], [`list`], [`presign_get`]) plus [`put`] for
//! the common case of an object already in memory.

pub use crate::bindings::celer::plugin::storage::*;

/// Bytes per `write` call in [`put`]: the host streams each chunk on (S3
/// multipart), so a chunk bounds what one host call copies.
pub const PUT_CHUNK: usize = 1 << 20;

/// Uploads `data` to `key` in [`PUT_CHUNK`]-sized writes and finishes the
/// object. On error the writer is dropped, which discards the upload.
pub fn put(key: &str, data: &[u8], content_type: Option<&str>) -> Result<ObjectInfo, HostError> {
    let writer = create(key, content_type)?;
    for chunk in data.chunks(PUT_CHUNK) {
        writer.write(chunk)?;
    }
    writer.finish()
}
