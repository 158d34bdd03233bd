//! The keys the parser accepts in each table, read from the serde definitions of the
//! raw structs ([`super::raw`]) themselves, so that whatever documents the file
//! (`blockd.toml(5)`, checked by a test of `blockd-docgen`) follows every key added
//! there.
//!
//! How: serde's derived `Deserialize` of a struct hands its field names (after
//! `rename_all`) to `Deserializer::deserialize_struct`. A deserializer that only
//! records them, and then refuses, reads that list without any input.

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::raw::{RawNode, RawResource};

/// The keys of `[resource]`, in declaration order.
pub fn resource_keys() -> &'static [&'static str] {
    field_names::<RawResource>()
}

/// The keys of each `[[node]]`, in declaration order.
pub fn node_keys() -> &'static [&'static str] {
    field_names::<RawNode>()
}

/// The field names `T` declares; empty if `T` is not deserialized as a plain struct
/// (e.g. with `#[serde(flatten)]`), which the documentation test reports.
fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut recorder = FieldNames(&[]);
    let _ = T::deserialize(&mut recorder);
    recorder.0
}

struct FieldNames(&'static [&'static str]);

impl<'de> Deserializer<'de> for &mut FieldNames {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        Err(de::Error::custom("only the field names are read"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_the_raw_structs_in_kebab_case() {
        let resource = resource_keys();
        assert!(resource.contains(&"name") && resource.contains(&"resync-min-rate"), "{resource:?}");
        let node = node_keys();
        assert!(node.contains(&"disk") && node.contains(&"oom-score-adj"), "{node:?}");
        assert!(!node.contains(&"oom_score_adj"));
    }
}
