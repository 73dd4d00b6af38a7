//! Finding out what shape a task's argument type has, before decoding it.
//!
//! Celery jobs carry positional `args` and keyword `kwargs`; a Rust task takes
//! one typed value. To put positional arguments under the right names we need
//! the struct's field names, which serde only reveals to a `Deserializer`: a
//! derived `Deserialize` calls `deserialize_struct(name, FIELDS, visitor)`.
//! [`shape_of`] hands the type a deserializer that records which method was
//! called (and the field list) and then stops with an error, so nothing is
//! ever decoded (the "serde_introspect" trick).

use core::fmt;

use serde::de::{self, DeserializeOwned, Visitor};

/// What kind of value a type expects, as far as argument mapping cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A struct with named fields, in declaration order (serialized names).
    Struct(&'static [&'static str]),
    /// `()` or a unit struct: a task without arguments.
    Unit,
    /// One plain value (number, string, bool, char) or an `Option` of one.
    Single,
    /// A sequence: `Vec`, tuple, tuple struct.
    Seq,
    /// A map: `HashMap`, `BTreeMap`, or a struct with `#[serde(flatten)]`.
    Map,
    /// Anything else (enums, `serde_json::Value`, newtypes, bytes).
    Other,
}

/// The shape of `T`, found without any input.
pub(crate) fn shape_of<T: DeserializeOwned>() -> Shape {
    match T::deserialize(Introspector) {
        Err(Stop(shape)) => shape,
        // Unreachable in practice: every method below returns an error.
        Ok(_) => Shape::Other,
    }
}

/// The deserializer that only records what it was asked for.
struct Introspector;

/// The "error" that carries the answer out of `deserialize`.
#[derive(Debug)]
struct Stop(Shape);

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "introspected {:?}", self.0)
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Stop(Shape::Other)
    }
}

/// One `deserialize_*` method that answers `$shape`.
macro_rules! answer {
    ($shape:expr => $($method:ident)*) => {
        $(fn $method<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop($shape))
        })*
    };
}

impl<'de> de::Deserializer<'de> for Introspector {
    type Error = Stop;

    answer!(Shape::Other => deserialize_any deserialize_bytes deserialize_byte_buf
        deserialize_identifier deserialize_ignored_any);
    answer!(Shape::Single => deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
        deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
        deserialize_str deserialize_string deserialize_option);
    answer!(Shape::Unit => deserialize_unit);
    answer!(Shape::Seq => deserialize_seq);
    answer!(Shape::Map => deserialize_map);

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        Err(Stop(Shape::Struct(fields)))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, _: V) -> Result<V::Value, Stop> {
        Err(Stop(Shape::Unit))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, _: V) -> Result<V::Value, Stop> {
        Err(Stop(Shape::Other))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, Stop> {
        Err(Stop(Shape::Seq))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        _: V,
    ) -> Result<V::Value, Stop> {
        Err(Stop(Shape::Seq))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        Err(Stop(Shape::Other))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Named {
        first: i64,
        #[serde(rename = "second_name")]
        second: Option<String>,
    }

    #[derive(Deserialize)]
    struct Empty;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Pair(i64, i64);

    #[test]
    fn shapes() {
        assert_eq!(shape_of::<Named>(), Shape::Struct(&["first", "second_name"]));
        assert_eq!(shape_of::<()>(), Shape::Unit);
        assert_eq!(shape_of::<Empty>(), Shape::Unit);
        assert_eq!(shape_of::<i64>(), Shape::Single);
        assert_eq!(shape_of::<String>(), Shape::Single);
        assert_eq!(shape_of::<Option<u32>>(), Shape::Single);
        assert_eq!(shape_of::<Vec<i64>>(), Shape::Seq);
        assert_eq!(shape_of::<(i64, String)>(), Shape::Seq);
        assert_eq!(shape_of::<Pair>(), Shape::Seq);
        assert_eq!(shape_of::<HashMap<String, i64>>(), Shape::Map);
        assert_eq!(shape_of::<serde_json::Value>(), Shape::Other);
    }
}
