//! A payload parse that keeps only the paths a source reads.
//!
//! A source whose fields and conditions are all paths reads a few values of a payload, yet a
//! full parse builds the whole `serde_json::Value` tree (an allocation per key and string, a
//! B-tree insert per key). [`Projection::parse`] walks the same JSON with `serde_json`'s
//! parser and a trie of the paths: under a key the trie ends at, it keeps the whole value; under
//! a key the trie goes on from, it keeps an object with only the keys the trie lists (anything
//! else there becomes `null`: no path lookup descends into it); every other value is parsed
//! and dropped without allocating. The pruned map answers every lookup of those paths as the
//! full payload would.
//!
//! It accepts exactly the payloads a full parse accepts, or fewer: dropped values go through
//! `deserialize_any` with the same checks as a full parse (lone surrogates in escapes, numbers
//! out of range, the nesting limit), not through `IgnoredAny`, whose skipping checks less.
//! Whatever it rejects, the caller parses in full, so errors are those of the full parse.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The paths of a payload a source reads, as a trie.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Projection {
    root: Vec<(String, Node)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A path ends here: keep the whole value.
    Leaf,
    /// Paths go on: keep only these keys of an object.
    Inner(Vec<(String, Node)>),
}

impl Projection {
    /// The trie of `paths` (each a list of segments).
    pub(super) fn new<'a>(paths: impl IntoIterator<Item = &'a [String]>) -> Self {
        let mut root = Vec::new();
        for path in paths {
            insert(&mut root, path);
        }
        Self { root }
    }

    /// The payload with only the projected paths, or `None` when `text` is not a JSON object
    /// that a full parse accepts (or, in cases a full parse accepts, when this parse cannot
    /// tell: the caller parses those in full).
    pub(super) fn parse(&self, text: &str) -> Option<Map<String, Value>> {
        let mut de = serde_json::Deserializer::from_str(text);
        let map = de.deserialize_map(Pruned(&self.root)).ok()?;
        de.end().ok()?;
        match map {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }
}

fn insert(children: &mut Vec<(String, Node)>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let i = match children.iter().position(|(k, _)| k == first) {
        Some(i) => i,
        None => {
            let node = if rest.is_empty() {
                Node::Leaf
            } else {
                Node::Inner(Vec::new())
            };
            children.push((first.clone(), node));
            children.len() - 1
        }
    };
    match (&mut children[i].1, rest.is_empty()) {
        // The whole value is kept already.
        (Node::Leaf, _) => {}
        (node @ Node::Inner(_), true) => *node = Node::Leaf,
        (Node::Inner(grandchildren), false) => insert(grandchildren, rest),
    }
}

/// Deserializes a value under an inner node: an object keeps the trie's keys, anything else
/// is checked, dropped and stands as `null`.
#[derive(Clone, Copy)]
struct Pruned<'t>(&'t [(String, Node)]);

impl<'de> DeserializeSeed<'de> for Pruned<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pruned<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(child) = access.next_key_seed(Child(self.0))? {
            match child.map(|i| &self.0[i]) {
                None => {
                    access.next_value::<Checked>()?;
                }
                Some((key, Node::Leaf)) => {
                    // Last one wins for duplicate keys, as in a full parse.
                    out.insert(key.clone(), access.next_value()?);
                }
                Some((key, Node::Inner(children))) => {
                    out.insert(key.clone(), access.next_value_seed(Pruned(children))?);
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, access: A) -> Result<Value, A::Error> {
        Checked.visit_seq(access).map(|_| Value::Null)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// An object key, as the index of the trie child it names (`None`: not projected). The key
/// is compared where the parser holds it, without allocating.
struct Child<'t>(&'t [(String, Node)]);

impl<'de> DeserializeSeed<'de> for Child<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Child<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|(k, _)| k == key))
    }
}

/// A value parsed with every check of a full parse, and dropped.
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Checked, A::Error> {
        while access.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Checked, A::Error> {
        while access.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
}
