//! Turning a job's Celery-style `args` (JSON array) and `kwargs` (JSON
//! object) into the one typed value a task takes.
//!
//! Producers call a task the way Celery does (`task.delay(42, requested_by=7)`),
//! while a Rust task wants a struct. The rules, by the shape of the type:
//!
//! | task takes            | `args` only                  | `kwargs` only | both                      | neither |
//! |-----------------------|------------------------------|---------------|---------------------------|---------|
//! | struct `{a, b, …}`    | named in field order         | by name       | args named, then merged   | `{}`    |
//! | `()` / unit struct    | error                        | error         | error                     | ok      |
//! | one value / `Option`  | exactly one                  | error         | error                     | `null`  |
//! | `Vec` / tuple         | the array                    | error         | error                     | `[]`    |
//! | map                   | error                        | the object    | error                     | `{}`    |
//! | anything else         | the array                    | the object    | error                     | `[]`    |
//!
//! Naming positional arguments (rather than decoding a struct from the array)
//! lets trailing `Option` fields be left out, as in Python. A positional
//! argument that a keyword argument also names is an error, as in Python.
//! Every error message starts with `invalid arguments:`, which the host maps
//! to the error kind `invalid-args`.

use core::fmt;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::introspect::{Shape, shape_of};

/// The prefix of every argument error; the host recognises a `fail` that
/// starts with it and reports the job's error kind as `invalid-args`.
pub const INVALID_ARGUMENTS: &str = "invalid arguments:";

/// Arguments that do not fit the task's argument type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgsError(String);

impl ArgsError {
    fn new(detail: impl fmt::Display) -> Self {
        Self(format!("{INVALID_ARGUMENTS} {detail}"))
    }

    /// The full message, starting with [`INVALID_ARGUMENTS`].
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgsError {}

/// Bad arguments are the caller's mistake: retrying cannot fix them.
impl From<ArgsError> for crate::TaskError {
    fn from(error: ArgsError) -> Self {
        crate::TaskError::Fail(error.0)
    }
}

/// Decodes the job's `args` and `kwargs` JSON texts into `A` (see the module
/// docs for the rules). An empty text or `null` counts as no arguments.
pub fn decode<A: DeserializeOwned>(args: &str, kwargs: &str) -> Result<A, ArgsError> {
    let args = parse_args(args)?;
    let kwargs = parse_kwargs(kwargs)?;
    let value = arrange(shape_of::<A>(), args, kwargs)?;
    A::deserialize(value).map_err(ArgsError::new)
}

/// `args` as a list; the host sends a JSON array, but be lenient about "no args".
fn parse_args(text: &str) -> Result<Vec<Value>, ArgsError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str::<Option<Vec<Value>>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| ArgsError::new(format_args!("`args` is not a JSON array: {e}")))
}

/// `kwargs` as a map; the host sends a JSON object, but be lenient about "no kwargs".
fn parse_kwargs(text: &str) -> Result<Map<String, Value>, ArgsError> {
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    serde_json::from_str::<Option<Map<String, Value>>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| ArgsError::new(format_args!("`kwargs` is not a JSON object: {e}")))
}

/// Builds the one JSON value that `A` is then decoded from.
fn arrange(shape: Shape, args: Vec<Value>, kwargs: Map<String, Value>) -> Result<Value, ArgsError> {
    let (n_args, n_kwargs) = (args.len(), kwargs.len());
    match shape {
        Shape::Struct(fields) => name_positional(fields, args, kwargs).map(Value::Object),
        Shape::Unit if n_args == 0 && n_kwargs == 0 => Ok(Value::Null),
        Shape::Unit => Err(ArgsError::new(format_args!(
            "this task takes no arguments, got {n_args} positional and {n_kwargs} keyword"
        ))),
        Shape::Single if n_kwargs == 0 && n_args <= 1 => {
            Ok(args.into_iter().next().unwrap_or(Value::Null))
        }
        Shape::Single => Err(ArgsError::new(format_args!(
            "this task takes one positional argument, got {n_args} positional and {n_kwargs} keyword"
        ))),
        Shape::Seq if n_kwargs == 0 => Ok(Value::Array(args)),
        Shape::Seq => Err(ArgsError::new(format_args!(
            "this task takes positional arguments only, got {n_kwargs} keyword"
        ))),
        Shape::Map if n_args == 0 => Ok(Value::Object(kwargs)),
        Shape::Map => Err(ArgsError::new(format_args!(
            "this task takes keyword arguments only, got {n_args} positional"
        ))),
        Shape::Other if n_kwargs == 0 => Ok(Value::Array(args)),
        Shape::Other if n_args == 0 => Ok(Value::Object(kwargs)),
        Shape::Other => Err(ArgsError::new(
            "this task takes positional or keyword arguments, not both",
        )),
    }
}

/// Puts positional arguments under the struct's field names, in order, and
/// adds the keyword arguments; a name given both ways is an error.
fn name_positional(
    fields: &'static [&'static str],
    args: Vec<Value>,
    mut kwargs: Map<String, Value>,
) -> Result<Map<String, Value>, ArgsError> {
    if args.len() > fields.len() {
        return Err(ArgsError::new(format_args!(
            "this task takes at most {} positional arguments ({}), got {}",
            fields.len(),
            fields.join(", "),
            args.len()
        )));
    }
    for (name, value) in fields.iter().zip(args) {
        if kwargs.contains_key(*name) {
            return Err(ArgsError::new(format_args!(
                "got multiple values for argument `{name}`"
            )));
        }
        kwargs.insert((*name).to_owned(), value);
    }
    Ok(kwargs)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Greet {
        name: String,
        excited: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Export {
        organization_id: i64,
        requested_by: i64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        a: i64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Unit;

    fn err<A: DeserializeOwned + fmt::Debug>(args: &str, kwargs: &str) -> String {
        let message = decode::<A>(args, kwargs).expect_err("decoding should fail").0;
        assert!(message.starts_with("invalid arguments: "), "{message}");
        message
    }

    #[test]
    fn struct_from_positional_args_in_field_order() {
        let g: Greet = decode(r#"["Ann", true]"#, "{}").unwrap();
        assert_eq!(g, Greet { name: "Ann".into(), excited: Some(true) });
    }

    #[test]
    fn trailing_option_fields_may_be_left_out() {
        let g: Greet = decode(r#"["Ann"]"#, "{}").unwrap();
        assert_eq!(g, Greet { name: "Ann".into(), excited: None });
    }

    #[test]
    fn struct_from_kwargs() {
        let g: Greet = decode("[]", r#"{"name": "Bo", "excited": false}"#).unwrap();
        assert_eq!(g, Greet { name: "Bo".into(), excited: Some(false) });
    }

    #[test]
    fn struct_from_args_and_kwargs_merged_by_name() {
        let e: Export = decode("[42]", r#"{"requested_by": 7}"#).unwrap();
        assert_eq!(e, Export { organization_id: 42, requested_by: 7 });
    }

    #[test]
    fn positional_arg_colliding_with_kwarg_is_an_error() {
        let m = err::<Export>("[42]", r#"{"organization_id": 1}"#);
        assert!(m.contains("multiple values for argument `organization_id`"), "{m}");
    }

    #[test]
    fn too_many_positional_args_is_an_error() {
        let m = err::<Export>("[1, 2, 3]", "{}");
        assert!(m.contains("at most 2 positional arguments (organization_id, requested_by), got 3"), "{m}");
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let m = err::<Greet>("[]", "{}");
        assert!(m.contains("missing field `name`"), "{m}");
        let m = err::<Export>(r#"["x", 1]"#, "{}");
        assert!(m.contains("invalid type: string \"x\", expected i64"), "{m}");
    }

    #[test]
    fn unknown_kwargs_follow_the_struct_serde_attributes() {
        let s: Export = decode("[1, 2]", r#"{"extra": true}"#).unwrap();
        assert_eq!(s, Export { organization_id: 1, requested_by: 2 });
        let m = err::<Strict>("[1]", r#"{"b": 2}"#);
        assert!(m.contains("unknown field `b`"), "{m}");
    }

    #[test]
    fn unit_takes_nothing() {
        decode::<()>("[]", "{}").unwrap();
        decode::<()>("", "").unwrap();
        decode::<()>("null", "null").unwrap();
        decode::<Unit>("[]", "{}").unwrap();
        assert!(err::<()>("[1]", "{}").contains("takes no arguments, got 1 positional and 0 keyword"));
        assert!(err::<()>("[]", r#"{"a": 1}"#).contains("0 positional and 1 keyword"));
    }

    #[test]
    fn single_value_takes_one_positional_arg() {
        assert_eq!(decode::<i64>("[42]", "{}").unwrap(), 42);
        assert_eq!(decode::<String>(r#"["x"]"#, "").unwrap(), "x");
        assert_eq!(decode::<Option<i64>>("[]", "{}").unwrap(), None);
        assert_eq!(decode::<Option<i64>>("[5]", "{}").unwrap(), Some(5));
        assert!(err::<i64>("[1, 2]", "{}").contains("one positional argument"));
        assert!(err::<i64>("[]", r#"{"a": 1}"#).contains("one positional argument"));
        assert!(err::<i64>("[]", "{}").contains("invalid type: null, expected i64"));
    }

    #[test]
    fn sequences_and_tuples_take_the_array() {
        assert_eq!(decode::<Vec<i64>>("[1, 2]", "{}").unwrap(), vec![1, 2]);
        assert_eq!(decode::<Vec<i64>>("[]", "{}").unwrap(), Vec::<i64>::new());
        assert_eq!(decode::<(i64, String)>(r#"[1, "a"]"#, "{}").unwrap(), (1, "a".to_owned()));
        assert!(err::<Vec<i64>>("[1]", r#"{"a": 1}"#).contains("positional arguments only"));
        assert!(err::<(i64, i64)>("[1]", "{}").contains("invalid length 1"));
    }

    #[test]
    fn maps_take_the_object() {
        let m: BTreeMap<String, i64> = decode("[]", r#"{"a": 1}"#).unwrap();
        assert_eq!(m.get("a"), Some(&1));
        assert!(decode::<BTreeMap<String, i64>>("[]", "{}").unwrap().is_empty());
        assert!(err::<BTreeMap<String, i64>>("[1]", "{}").contains("keyword arguments only"));
    }

    #[test]
    fn other_types_take_either_but_not_both() {
        assert_eq!(decode::<Value>("[1]", "{}").unwrap(), serde_json::json!([1]));
        assert_eq!(decode::<Value>("[]", r#"{"a": 1}"#).unwrap(), serde_json::json!({"a": 1}));
        assert!(err::<Value>("[1]", r#"{"a": 1}"#).contains("not both"));
    }

    #[test]
    fn malformed_json_is_reported_as_invalid_arguments() {
        assert!(err::<Greet>(r#"{"name": "x"}"#, "{}").contains("`args` is not a JSON array"));
        assert!(err::<Greet>("[", "{}").contains("`args` is not a JSON array"));
        assert!(err::<Greet>("[]", "[1]").contains("`kwargs` is not a JSON object"));
        assert!(err::<Greet>("[]", "42").contains("`kwargs` is not a JSON object"));
    }
}
