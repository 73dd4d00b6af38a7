//! SQL on the host's database, limited to the tables the manifest grants.
//!
//! Everything the WIT `database` interface offers ([`query`], [`execute`],
//! [`begin`], [`commit`], [`rollback`], [`Cursor`], [`Value`]), plus
//! conversions so that parameters read naturally (`&[42.into(), "x".into()]`)
//! and [`query_all`] for the common "small result, read it all" case.
//!
//! Placeholders are `$1, $2, …` on PostgreSQL and `?` on SQLite; parameters
//! are always bound, never spliced into the SQL text.

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

#[cfg(test)]
mod tests {
    use super::*;

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
