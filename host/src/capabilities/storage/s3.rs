//! `s3://bucket/prefix`: any S3-compatible endpoint through aws-sdk-s3.
//!
//! Credentials and region come from the standard `AWS_*` environment (and
//! the SDK's usual chain); `AWS_ENDPOINT_URL` points at a non-AWS endpoint
//! (MinIO, s3s-fs, R2, …), always addressed path-style. A plugin's key `k`
//! is the object `<prefix>/k` in the bucket.
//!
//! Uploads are streamed: chunks are buffered into parts of [`PART_SIZE`]
//! and sent as a multipart upload, so the host holds at most one part per
//! open writer; an object smaller than one part is a single `PutObject` on
//! `finish`. A writer dropped unfinished aborts its multipart upload.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::storage::ObjectInfo;

/// Bytes per multipart part: S3's minimum for every part but the last.
pub const PART_SIZE: usize = 5 << 20;
/// S3 allows at most this many parts per upload (so objects up to ~48.8 GiB).
const MAX_PARTS: i32 = 10_000;

/// One bucket (and key prefix) on an S3-compatible endpoint.
pub struct S3Store {
    client: Client,
    bucket: String,
    /// `""` or `"some/prefix/"`.
    prefix: String,
}

fn unavailable<E, R>(op: &str, e: &SdkError<E, R>) -> HostError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    HostError::Unavailable(format!("storage: S3 {op}: {}", DisplayErrorContext(e)))
}

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn micros(t: Option<&DateTime>) -> i64 {
    t.map(|t| t.secs().saturating_mul(1_000_000).saturating_add(i64::from(t.subsec_nanos() / 1000))).unwrap_or(0)
}

impl S3Store {
    /// Builds the client for `s3://bucket/prefix`; no request is made (a
    /// store that is down at start is reported by `ping`, not fatal).
    pub async fn connect(url: &str) -> Result<S3Store, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url:?} is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{url:?} names no bucket (expected s3://bucket/prefix)"));
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        // The region is taken from the environment only, so that a host
        // without one never asks an instance-metadata service for it.
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".to_string());
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            )
            .load()
            .await;
        let config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            // Checksums only where S3 requires them: S3-compatible servers
            // differ in their support for the newer flexible checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(S3Store { client: Client::from_conf(config), bucket: bucket.to_string(), prefix })
    }

    /// `s3://bucket/prefix`, for the log.
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Whether the bucket answers (HeadBucket).
    pub async fn ping(&self) -> Result<(), String> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("S3 bucket {}: {}", self.bucket, DisplayErrorContext(&e)))
    }

    /// Size and modification time of `key`, none when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<(u64, i64)>, HostError> {
        match self.client.head_object().bucket(&self.bucket).key(self.full(key)).send().await {
            Ok(out) => Ok(Some((
                u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
                micros(out.last_modified()),
            ))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) || status(&e) == Some(404) => Ok(None),
            Err(e) => Err(unavailable("HeadObject", &e)),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, HostError> {
        Ok(self.head(key).await?.is_some())
    }

    /// Starts an upload; nothing is sent until a part is full or `finish`.
    pub fn create(&self, key: &str, content_type: Option<String>) -> S3Writer {
        S3Writer {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            full_key: self.full(key),
            content_type,
            upload_id: None,
            parts: Vec::new(),
            buf: Vec::new(),
            size: 0,
            done: false,
        }
    }

    /// The whole object when it is at most `max` bytes.
    pub async fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, HostError> {
        let out = match self.client.get_object().bucket(&self.bucket).key(self.full(key)).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) || status(&e) == Some(404) => {
                return Ok(None);
            }
            Err(e) => return Err(unavailable("GetObject", &e)),
        };
        let size = u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0);
        if size > max {
            return Err(too_big(key, size, max));
        }
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| HostError::Unavailable(format!("storage: S3 GetObject body: {}", DisplayErrorContext(&e))))?
            .into_bytes();
        if bytes.len() as u64 > max {
            return Err(too_big(key, bytes.len() as u64, max));
        }
        Ok(Some(bytes.to_vec()))
    }

    /// Deletes `key`; whether it existed (S3's DeleteObject does not say,
    /// so a HeadObject asks first).
    pub async fn delete(&self, key: &str) -> Result<bool, HostError> {
        if !self.exists(key).await? {
            return Ok(false);
        }
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| unavailable("DeleteObject", &e))?;
        Ok(true)
    }

    /// Objects under `prefix`, in key order, after `start_after`, at most `limit` (≤ 1000).
    pub async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<Vec<ObjectInfo>, HostError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .set_start_after(start_after.map(|s| self.full(s)))
            .max_keys(i32::try_from(limit).unwrap_or(1000))
            .send()
            .await
            .map_err(|e| unavailable("ListObjectsV2", &e))?;
        let mut found: Vec<ObjectInfo> = out
            .contents()
            .iter()
            .filter_map(|o| {
                let key = o.key()?.strip_prefix(self.prefix.as_str())?.to_string();
                Some(ObjectInfo {
                    key,
                    size: u64::try_from(o.size().unwrap_or(0)).unwrap_or(0),
                    modified: micros(o.last_modified()),
                })
            })
            .collect();
        found.truncate(limit);
        Ok(found)
    }

    /// A presigned GET URL of `key`, valid `expires`; `invalid` when there
    /// is no such object.
    pub async fn presign_get(&self, key: &str, expires: Duration) -> Result<String, HostError> {
        if !self.exists(key).await? {
            return Err(HostError::Invalid(format!("storage: no object {key:?}")));
        }
        let config = PresigningConfig::expires_in(expires).map_err(|e| HostError::Invalid(format!("storage: {e}")))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .presigned(config)
            .await
            .map_err(|e| unavailable("presign GetObject", &e))?;
        Ok(req.uri().to_string())
    }
}

fn too_big(key: &str, size: u64, max: u64) -> HostError {
    HostError::BudgetExceeded(format!(
        "storage: {key:?} is {size} bytes; get reads at most {max} bytes (use a download link for larger objects)"
    ))
}

/// A streamed upload to S3.
pub struct S3Writer {
    client: Client,
    bucket: String,
    key: String,
    full_key: String,
    content_type: Option<String>,
    /// Set once the first full part goes out.
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    /// The part being filled; never longer than [`PART_SIZE`].
    buf: Vec<u8>,
    size: u64,
    /// Completed (or aborted on purpose): nothing for Drop to do.
    done: bool,
}

impl S3Writer {
    pub async fn write(&mut self, mut chunk: &[u8]) -> Result<(), HostError> {
        while !chunk.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(PART_SIZE);
            }
            let n = (PART_SIZE - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk[..n]);
            self.size += n as u64;
            chunk = &chunk[n..];
            if self.buf.len() == PART_SIZE {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// Sends the buffered bytes as the next part, starting the multipart
    /// upload first when needed.
    async fn send_part(&mut self) -> Result<(), HostError> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let out = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.full_key)
                    .set_content_type(self.content_type.clone())
                    .send()
                    .await
                    .map_err(|e| unavailable("CreateMultipartUpload", &e))?;
                let id = out
                    .upload_id()
                    .ok_or_else(|| HostError::Unavailable("storage: S3 CreateMultipartUpload returned no upload id".into()))?
                    .to_string();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number = i32::try_from(self.parts.len()).unwrap_or(i32::MAX).saturating_add(1);
        if number > MAX_PARTS {
            return Err(HostError::BudgetExceeded(format!(
                "storage: {:?} is larger than S3 allows in {MAX_PARTS} parts of {PART_SIZE} bytes",
                self.key
            )));
        }
        let body = std::mem::take(&mut self.buf);
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.full_key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| unavailable("UploadPart", &e))?;
        self.parts.push(CompletedPart::builder().set_e_tag(out.e_tag().map(str::to_string)).part_number(number).build());
        Ok(())
    }

    /// Completes the upload (or puts the small object in one request).
    pub async fn finish(mut self) -> Result<ObjectInfo, HostError> {
        match self.upload_id.clone() {
            None => {
                let body = std::mem::take(&mut self.buf);
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&self.full_key)
                    .set_content_type(self.content_type.clone())
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(|e| unavailable("PutObject", &e))?;
            }
            Some(upload_id) => {
                if !self.buf.is_empty() {
                    self.send_part().await?;
                }
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.full_key)
                    .upload_id(upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut self.parts))).build())
                    .send()
                    .await
                    .map_err(|e| unavailable("CompleteMultipartUpload", &e))?;
            }
        }
        self.done = true;
        let modified = match self.client.head_object().bucket(&self.bucket).key(&self.full_key).send().await {
            Ok(out) => micros(out.last_modified()),
            Err(_) => micros(Some(&DateTime::from(std::time::SystemTime::now()))),
        };
        Ok(ObjectInfo { key: std::mem::take(&mut self.key), size: self.size, modified })
    }
}

impl Drop for S3Writer {
    /// An unfinished multipart upload is aborted, so that its parts do not
    /// linger (and cost) in the bucket. Drop cannot wait: the abort runs as
    /// a task of its own.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Some(upload_id) = self.upload_id.take() else { return };
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.full_key.clone());
        handle.spawn(async move {
            if let Err(e) =
                client.abort_multipart_upload().bucket(&bucket).key(&key).upload_id(&upload_id).send().await
            {
                tracing::warn!(bucket = %bucket, key = %key, error = %DisplayErrorContext(&e), "storage: could not abort an unfinished multipart upload");
            }
        });
    }
}
