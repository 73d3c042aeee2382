//! Values in transit: a `Payload` is what `parallax_data` encoded (its layout, the item ends and
//! the bytes), and on the wire a message's `DataMeta` plus two binary buffers, the ends and the
//! bytes. Both the controller and the engines read and write them here.

use bytes::Bytes;
use parallax_data::Meta;
use serde::{Deserialize, Serialize};

/// Encoded values in transit: what `parallax_data::Meta` says, the item ends and the bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload {
    pub meta: Meta,
    pub ends: Vec<u64>,
    pub data: Bytes,
}

impl Payload {
    /// Checks the layout of values that came from elsewhere.
    pub fn validate(&self) -> Result<(), String> {
        parallax_data::validate(&self.meta, &self.ends, self.data.len() as u64)
    }

    /// Items `start..end`, sharing the bytes.
    pub fn slice(&self, start: u64, end: u64) -> Payload {
        let (from, to) = parallax_data::byte_range(&self.meta, &self.ends, start, end);
        let ends = if self.meta.width > 0 {
            Vec::new()
        } else {
            self.ends[start as usize..end as usize]
                .iter()
                .map(|e| e - from as u64)
                .collect()
        };
        Payload {
            meta: Meta {
                count: end - start,
                ..self.meta.clone()
            },
            ends,
            data: self.data.slice(from..to),
        }
    }

    /// The items of every part, in order, as one payload. Parts must hold one type.
    pub fn concat(type_name: &str, parts: &[Payload]) -> Result<Payload, String> {
        let mut meta = Meta {
            type_name: type_name.to_owned(),
            ..Meta::default()
        };
        if let Some(first) = parts.first() {
            meta.width = first.meta.width;
            meta.elem_width = first.meta.elem_width;
        }
        for part in parts {
            if part.meta.type_name != type_name
                || part.meta.width != meta.width
                || part.meta.elem_width != meta.elem_width
            {
                return Err(format!(
                    "cannot join values of type `{}` with values of type `{}`",
                    part.meta.type_name, type_name
                ));
            }
        }
        if parts.len() == 1 {
            return Ok(parts[0].clone());
        }
        let total: usize = parts.iter().map(|p| p.data.len()).sum();
        let mut data = Vec::with_capacity(total);
        let mut ends = Vec::new();
        for part in parts {
            let base = data.len() as u64;
            ends.extend(part.ends.iter().map(|e| e + base));
            data.extend_from_slice(&part.data);
            meta.count += part.meta.count;
        }
        Ok(Payload {
            meta,
            ends,
            data: Bytes::from(data),
        })
    }
}

impl Payload {
    /// The payload a message carried: its `meta` and its two buffers, checked, since they came
    /// from another process.
    pub fn from_wire(meta: DataMeta, buffers: Vec<Bytes>) -> Result<Payload, String> {
        let [ends, data]: [Bytes; 2] = buffers
            .try_into()
            .map_err(|b: Vec<Bytes>| format!("{} buffers, expected 2", b.len()))?;
        let ends = ends_from_bytes(&ends).ok_or("item ends are not 8-byte numbers")?;
        let payload = Payload {
            meta: meta.into(),
            ends,
            data,
        };
        payload.validate()?;
        Ok(payload)
    }

    /// The buffers a message carries these values in: item ends, then bytes (shared, not
    /// copied).
    pub fn wire_buffers(&self) -> Vec<Bytes> {
        vec![ends_to_bytes(&self.ends), self.data.clone()]
    }

    /// Numbers as `usize` items (indices, as a cell reads them).
    pub fn usizes(values: &[u64]) -> Payload {
        let mut data = Vec::with_capacity(values.len() * 8);
        for value in values {
            data.extend_from_slice(&value.to_le_bytes());
        }
        Payload {
            meta: Meta {
                type_name: "usize".into(),
                count: values.len() as u64,
                width: 8,
                elem_width: 0,
            },
            ends: Vec::new(),
            data: Bytes::from(data),
        }
    }

    /// The layout as a message states it.
    pub fn wire_meta(&self) -> DataMeta {
        self.meta.clone().into()
    }
}

/// How the values in a message's buffers are laid out (see the `parallax_data` crate).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct DataMeta {
    pub type_name: String,
    pub count: u64,
    pub width: u32,
    pub elem_width: u32,
}

impl From<parallax_data::Meta> for DataMeta {
    fn from(meta: parallax_data::Meta) -> Self {
        DataMeta {
            type_name: meta.type_name,
            count: meta.count,
            width: meta.width,
            elem_width: meta.elem_width,
        }
    }
}

impl From<DataMeta> for parallax_data::Meta {
    fn from(meta: DataMeta) -> Self {
        parallax_data::Meta {
            type_name: meta.type_name,
            count: meta.count,
            width: meta.width,
            elem_width: meta.elem_width,
        }
    }
}

/// Item ends as the little-endian bytes a buffer carries.
fn ends_to_bytes(ends: &[u64]) -> Bytes {
    let mut bytes = Vec::with_capacity(ends.len() * 8);
    for end in ends {
        bytes.extend_from_slice(&end.to_le_bytes());
    }
    Bytes::from(bytes)
}

/// Item ends from a buffer; `None` if its length is not a multiple of 8.
fn ends_from_bytes(bytes: &[u8]) -> Option<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
    )
}
