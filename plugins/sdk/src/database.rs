//! SQL on the host's database, limited to the tables the manifest grants.
//!
//! Everything the WIT `database` interface offers ([`query`], [`execute`],
//! [`begin`], [`commit`], [`rollback`], [`Cursor`], [`Value`]), plus
//! conversions so that parameters read naturally (`&[42.into(), "x".into()]`)
//! and [`query_all`] for the common "small result, read it all" case.
//!
//! Placeholders are `$1, $2, …` on every backend (the host rewrites them for
//! SQLite); parameters are always bound, never spliced into the SQL text. For
//! time bounds, bind a [`Value::Timestamp`] computed with
//! [`time`](crate::time) rather than calling the database's `now()`.

pub use crate::bindings::celer::plugin::database::*;

/// Rows fetched per round trip by [`query_all`]: few enough to keep memory
/// bounded per call, enough to keep host calls rare.
pub const BATCH_ROWS: u32 = 256;

/// Runs a read statement and collects every row, reading the cursor in
/// batches of [`BATCH_ROWS`]. The host's row and byte budget still applies
/// (`budget-exceeded`); for large results, read the [`Cursor`] yourself.
pub fn query_all(sql: &str, params: &[Value]) -> Result<Vec<Row>, HostError> {
    let cursor = query(sql, params)?;
    let mut rows = Vec::new();
    loop {
        let batch = cursor.next(BATCH_ROWS)?;
        if batch.is_empty() {
            return Ok(rows);
        }
        rows.extend(batch);
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Boolean(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}

/// A JSON document goes in as the `json` variant (JSON text), not as text.
impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        Value::Json(v.to_string())
    }
}

/// `None` binds SQL `NULL`.
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Reading columns the same way on every backend: SQLite has no boolean or
/// timestamp storage class (it returns `int` 0/1 and the text the host wrote,
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`), PostgreSQL returns `boolean` and
/// `timestamp`. These accessors accept both, so a plugin need not care.
impl Value {
    /// An `int`, or a `float` with no fraction; `None` otherwise.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
            _ => None,
        }
    }

    /// `text` or `json` as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) | Value::Json(s) => Some(s),
            _ => None,
        }
    }

    /// A `boolean`, or an `int` (0 is false).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Boolean(b) => Some(*b),
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }

    /// A `timestamp`, or `text` that [`time::parse_utc`](crate::time::parse_utc)
    /// reads, as microseconds since the epoch (UTC).
    pub fn as_micros(&self) -> Option<i64> {
        match self {
            Value::Timestamp(t) => Some(*t),
            Value::Text(s) => crate::time::parse_utc(s),
            _ => None,
        }
    }

    /// Whether this is SQL `NULL`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_read_both_backends_alike() {
        assert_eq!(Value::Int(1).as_bool(), Some(true));
        assert_eq!(Value::Boolean(false).as_bool(), Some(false));
        assert_eq!(Value::Text("x".into()).as_bool(), None);
        assert_eq!(Value::Int(7).as_i64(), Some(7));
        assert_eq!(Value::Float(7.0).as_i64(), Some(7));
        assert_eq!(Value::Float(7.5).as_i64(), None);
        assert_eq!(Value::Text("a".into()).as_str(), Some("a"));
        assert_eq!(Value::Timestamp(5).as_micros(), Some(5));
        assert_eq!(Value::Text("1970-01-01T00:00:01.000000Z".into()).as_micros(), Some(1_000_000));
        assert!(Value::Null.is_null() && Value::Null.as_micros().is_none());
    }

    #[test]
    fn parameters_convert_from_plain_rust_values() {
        assert_eq!(Value::from(true), Value::Boolean(true));
        assert_eq!(Value::from(7_i64), Value::Int(7));
        assert_eq!(Value::from(-7_i32), Value::Int(-7));
        assert_eq!(Value::from(u32::MAX), Value::Int(4_294_967_295));
        assert_eq!(Value::from(1.5), Value::Float(1.5));
        assert_eq!(Value::from("a"), Value::Text("a".into()));
        assert_eq!(Value::from(String::from("b")), Value::Text("b".into()));
        assert_eq!(Value::from(&String::from("c")), Value::Text("c".into()));
        assert_eq!(Value::from(vec![1_u8, 2]), Value::Bytes(vec![1, 2]));
        assert_eq!(Value::from(&b"xy"[..]), Value::Bytes(b"xy".to_vec()));
        assert_eq!(Value::from(serde_json::json!({"a": 1})), Value::Json(r#"{"a":1}"#.into()));
        assert_eq!(Value::from(None::<i64>), Value::Null);
        assert_eq!(Value::from(Some("x")), Value::Text("x".into()));
        let params: [Value; 3] = [42.into(), "x".into(), None::<bool>.into()];
        assert_eq!(params[0], Value::Int(42));
    }
}
