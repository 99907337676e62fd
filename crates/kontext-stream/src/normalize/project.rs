//! A payload parse that keeps only the paths a source reads.
//!
//! A source whose fields and conditions are all paths reads a few values of a payload, yet a
//! full parse builds the whole `serde_json::Value` tree (an allocation per key and string, a
//! B-tree insert per key). [`Projection::parse`] walks the same JSON with `serde_json`'s
//! parser and a trie of the paths, and builds no map: the value under a key the trie ends at
//! goes into that leaf's slot (a path that goes on inside it is looked up in that value); the
//! keys a trie node lists are looked for in an object, and anything else under such a key
//! (an array, a string ...) leaves its slots empty, as no path lookup finds anything there.
//! Every other value is parsed and dropped without allocating. A duplicate key replaces what
//! the earlier one filled (the last one wins, as in a full parse), so the slots answer every
//! lookup of those paths as the full payload would.
//!
//! It accepts exactly the payloads a full parse accepts: dropped values go through
//! `deserialize_any` with the same checks as a full parse (lone surrogates in escapes, numbers
//! out of range, the nesting limit), not through `IgnoredAny`, whose skipping checks less.
//! Whatever it rejects, the caller parses in full, so errors are those of the full parse.

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The paths of a payload a source reads, as a trie whose leaves are numbered slots.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Projection {
    root: Vec<(String, Node)>,
    slots: usize,
}

/// The values a projected parse kept, one per slot (`None`: absent).
pub(super) type Slots = Vec<Option<Value>>;

/// Where a path's value is found in [`Slots`]: `slot` holds the value at the path's first
/// `depth` segments, the rest of the path is looked up inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SlotPath {
    pub(super) slot: usize,
    pub(super) depth: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A path ends here: keep the whole value in this slot.
    Leaf(usize),
    /// Paths go on: look for these keys in an object; `slots` are the leaves below.
    Inner {
        children: Vec<(String, Node)>,
        slots: Range<usize>,
    },
}

impl Projection {
    /// The trie of `paths` (each a list of segments).
    pub(super) fn new<'a>(paths: impl IntoIterator<Item = &'a [String]>) -> Self {
        let mut root = Vec::new();
        for path in paths {
            insert(&mut root, path);
        }
        let mut slots = 0;
        number(&mut root, &mut slots);
        Self { root, slots }
    }

    /// Where the value of `path` is kept; `None` for a path the trie was not built from.
    pub(super) fn slot(&self, path: &[String]) -> Option<SlotPath> {
        let mut children = &self.root;
        for (depth, segment) in path.iter().enumerate() {
            match &children.iter().find(|(k, _)| k == segment)?.1 {
                Node::Leaf(slot) => {
                    return Some(SlotPath {
                        slot: *slot,
                        depth: depth + 1,
                    })
                }
                Node::Inner { children: c, .. } => children = c,
            }
        }
        None
    }

    /// The values of the projected paths, or `None` when `text` is not a JSON object that a
    /// full parse accepts.
    pub(super) fn parse(&self, text: &str) -> Option<Slots> {
        let mut slots = vec![None; self.slots];
        let mut de = serde_json::Deserializer::from_str(text);
        de.deserialize_map(Fill {
            children: &self.root,
            slots: &mut slots,
        })
        .ok()?;
        de.end().ok()?;
        Some(slots)
    }
}

fn insert(children: &mut Vec<(String, Node)>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let i = match children.iter().position(|(k, _)| k == first) {
        Some(i) => i,
        None => {
            children.push((first.clone(), inner()));
            children.len() - 1
        }
    };
    match (&mut children[i].1, rest.is_empty()) {
        // The whole value is kept already.
        (Node::Leaf(_), _) => {}
        (node @ Node::Inner { .. }, true) => *node = Node::Leaf(0),
        (Node::Inner { children, .. }, false) => insert(children, rest),
    }
}

fn inner() -> Node {
    Node::Inner {
        children: Vec::new(),
        slots: 0..0,
    }
}

/// Numbers the leaves depth first, so that the slots below a node are a range.
fn number(children: &mut [(String, Node)], next: &mut usize) {
    for (_, node) in children {
        match node {
            Node::Leaf(slot) => {
                *slot = *next;
                *next += 1;
            }
            Node::Inner { children, slots } => {
                let start = *next;
                number(children, next);
                *slots = start..*next;
            }
        }
    }
}

/// Parses a value under an inner node: the trie's keys of an object fill their slots,
/// anything else is checked and dropped.
struct Fill<'t, 's> {
    children: &'t [(String, Node)],
    slots: &'s mut [Option<Value>],
}

impl<'de> DeserializeSeed<'de> for Fill<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fill<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        while let Some(child) = access.next_key_seed(Child(self.children))? {
            match child.map(|i| &self.children[i].1) {
                None => {
                    access.next_value::<Checked>()?;
                }
                Some(Node::Leaf(slot)) => self.slots[*slot] = Some(access.next_value()?),
                Some(Node::Inner { children, slots }) => {
                    // A duplicate key replaces all that the earlier one filled.
                    self.slots[slots.clone()].fill(None);
                    access.next_value_seed(Fill {
                        children,
                        slots: &mut *self.slots,
                    })?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, access: A) -> Result<(), A::Error> {
        Checked.visit_seq(access).map(drop)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
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
        check_key(key)?;
        Ok(self.0.iter().position(|(k, _)| k == key))
    }
}

/// Declines (so the caller parses in full) an object with a key `serde_json`'s `Value` treats
/// specially when it comes first: with the `raw_value` feature (on in the `kontext` binary,
/// through axum) `{"$serde_json::private::RawValue": "<json>"}` parses as `<json>`, and with
/// `arbitrary_precision` `"$serde_json::private::Number"` as a number.
fn check_key<E: de::Error>(key: &str) -> Result<(), E> {
    if key.starts_with("$serde_json::private::") {
        return Err(E::custom("a serde_json private key"));
    }
    Ok(())
}

/// An object key of a dropped value, checked with [`check_key`].
struct CheckedKey;

impl<'de> de::Deserialize<'de> for CheckedKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CheckedKey, D::Error> {
        deserializer.deserialize_str(CheckedKey)
    }
}

impl<'de> Visitor<'de> for CheckedKey {
    type Value = CheckedKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<CheckedKey, E> {
        check_key(key)?;
        Ok(CheckedKey)
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
        while access.next_entry::<CheckedKey, Checked>()?.is_some() {}
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
