//! The bridge from `std::io::Write` (what the zip writer wants) to the host's
//! streamed storage `writer` (what the plugin has): bytes are gathered into
//! chunks of a fixed size and each full chunk goes to the host in one call,
//! so memory stays at one chunk whatever the size of the export, and host
//! calls stay few.

use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;

use celer_plugin::HostError;
use celer_plugin::storage::Writer;

/// Where chunks go: the host's storage writer, or a test double.
pub trait ChunkSink {
    fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), HostError>;
}

impl ChunkSink for Writer {
    fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), HostError> {
        self.write(chunk)
    }
}

/// The host error that stopped a write, kept beside the `io::Error` that the
/// zip writer sees, so that the task can still tell `unavailable` (retry)
/// from `denied` (fail).
pub type ErrorSlot = Rc<RefCell<Option<HostError>>>;

/// An `io::Write` that forwards whole chunks of `cap` bytes to a
/// [`ChunkSink`]; the last, partial chunk goes out on [`Chunked::finish`].
pub struct Chunked<S: ChunkSink> {
    sink: S,
    buf: Vec<u8>,
    cap: usize,
    error: ErrorSlot,
    /// Bytes handed to the sink so far.
    pub sent: u64,
    /// Chunks handed to the sink so far.
    pub chunks: u64,
}

impl<S: ChunkSink> Chunked<S> {
    pub fn new(sink: S, cap: usize, error: ErrorSlot) -> Self {
        let cap = cap.max(1);
        Self { sink, buf: Vec::with_capacity(cap), cap, error, sent: 0, chunks: 0 }
    }

    fn push(&mut self) -> Result<(), HostError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.sink.write_chunk(&self.buf) {
            *self.error.borrow_mut() = Some(e.clone());
            return Err(e);
        }
        self.sent += self.buf.len() as u64;
        self.chunks += 1;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered and returns the sink (to finish the upload).
    pub fn finish(mut self) -> Result<S, HostError> {
        self.push()?;
        Ok(self.sink)
    }

    /// Bytes buffered, not yet sent.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

impl<S: ChunkSink> Write for Chunked<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(e) = self.error.borrow().as_ref() {
            return Err(io::Error::other(format!("storage write failed earlier: {e:?}")));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let n = data.len().min(self.cap - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.cap {
            self.push().map_err(|e| io::Error::other(format!("storage write failed: {e:?}")))?;
        }
        Ok(n)
    }

    /// Chunks go out only when full (or at `finish`): a flush from the zip
    /// writer must not turn into a tiny host call.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Records every chunk it gets; can be told to fail on the n-th.
    #[derive(Default)]
    pub struct FakeSink {
        pub chunks: Vec<Vec<u8>>,
        pub fail_at: Option<(usize, HostError)>,
    }

    impl FakeSink {
        pub fn bytes(&self) -> Vec<u8> {
            self.chunks.concat()
        }
    }

    impl ChunkSink for FakeSink {
        fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), HostError> {
            if let Some((n, e)) = &self.fail_at
                && self.chunks.len() == *n
            {
                return Err(e.clone());
            }
            self.chunks.push(chunk.to_vec());
            Ok(())
        }
    }

    #[test]
    fn forwards_full_chunks_then_the_rest() {
        let slot = ErrorSlot::default();
        let mut w = Chunked::new(FakeSink::default(), 4, slot.clone());
        w.write_all(b"abcdefghij").unwrap();
        w.flush().unwrap();
        assert_eq!(w.buffered(), 2);
        assert_eq!((w.sent, w.chunks), (8, 2));
        let sink = w.finish().unwrap();
        assert_eq!(sink.chunks, vec![b"abcd".to_vec(), b"efgh".to_vec(), b"ij".to_vec()]);
        assert!(slot.borrow().is_none());
    }

    #[test]
    fn a_host_error_is_kept_and_every_later_write_fails() {
        let slot = ErrorSlot::default();
        let sink = FakeSink { chunks: Vec::new(), fail_at: Some((1, HostError::Unavailable("s3 down".into()))) };
        let mut w = Chunked::new(sink, 2, slot.clone());
        let err = w.write_all(b"abcdef").unwrap_err();
        assert!(err.to_string().contains("s3 down"), "{err}");
        assert_eq!(*slot.borrow(), Some(HostError::Unavailable("s3 down".into())));
        assert!(w.write_all(b"x").is_err());
    }
}
