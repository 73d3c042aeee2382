//! Values in transit: a `Payload` is what `parallax_data` encoded (its layout, the item ends and
//! the bytes), and on the wire a message's `DataMeta` plus binary buffers: the ends, then the
//! bytes, unless the message names a region of shared memory on the receiver's host that
//! holds them. Both the controller and the engines read and write them here.

use crate::shared::{Region, Segment, SegmentFile};
use bytes::Bytes;
use parallax_data::Meta;
use serde::{Deserialize, Serialize};

/// Encoded values in transit: what `parallax_data::Meta` says, the item ends and the bytes;
/// and, when the bytes are a file of shared memory mapped, where in which file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload {
    pub meta: Meta,
    pub ends: Vec<u64>,
    pub data: Bytes,
    pub segment: Option<Segment>,
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
            segment: self.segment.as_ref().map(|segment| Segment {
                file: segment.file.clone(),
                offset: segment.offset + from as u64,
            }),
        }
    }

    /// The items of every part, in order, as one payload. Parts must hold one type.
    pub fn concat(type_name: &str, parts: &[Payload]) -> Result<Payload, String> {
        let (meta, ends) = Payload::joined_layout(type_name, parts)?;
        if parts.len() == 1 {
            return Ok(parts[0].clone());
        }
        let total: usize = parts.iter().map(|p| p.data.len()).sum();
        let mut data = Vec::with_capacity(total);
        for part in parts {
            data.extend_from_slice(&part.data);
        }
        Ok(Payload {
            meta,
            ends,
            data: Bytes::from(data),
            segment: None,
        })
    }

    /// The layout of every part's items, in order, as one: what `concat` makes, without its
    /// bytes. Parts must hold one type.
    pub fn joined_layout(type_name: &str, parts: &[Payload]) -> Result<(Meta, Vec<u64>), String> {
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
        let mut ends = Vec::new();
        let mut base = 0u64;
        for part in parts {
            ends.extend(part.ends.iter().map(|e| e + base));
            base += part.data.len() as u64;
            meta.count += part.meta.count;
        }
        Ok((meta, ends))
    }
}

impl Payload {
    /// The payload a message carried: its `meta` and its two buffers, checked, since they came
    /// from another process.
    pub fn from_wire(meta: DataMeta, buffers: Vec<Bytes>) -> Result<Payload, String> {
        Payload::from_message(meta, buffers, None, false)
    }

    /// The payload a message carried: its `meta`, the item ends in its first buffer, and the
    /// bytes in the second or, when it names one, in a region of shared memory on this host
    /// (mapped, not read; removed when the payload goes if `owned`). Checked, since it came
    /// from another process.
    pub fn from_message(
        meta: DataMeta,
        mut buffers: Vec<Bytes>,
        region: Option<Region>,
        owned: bool,
    ) -> Result<Payload, String> {
        let expected = if region.is_some() { 1 } else { 2 };
        if buffers.len() != expected {
            return Err(format!("{} buffers, expected {expected}", buffers.len()));
        }
        let (data, segment) = match region {
            Some(region) => {
                let path = std::path::PathBuf::from(&region.path);
                let file = if owned {
                    SegmentFile::expected(path)
                } else {
                    SegmentFile::borrowed(path)
                };
                let data = file
                    .map(region.offset, region.len)
                    .map_err(|e| format!("cannot map {}: {e}", region.path))?;
                let segment = Segment {
                    file,
                    offset: region.offset,
                };
                (data, Some(segment))
            }
            None => (buffers.pop().unwrap_or_default(), None),
        };
        let ends = buffers.pop().unwrap_or_default();
        let ends = ends_from_bytes(&ends).ok_or("item ends are not 8-byte numbers")?;
        let payload = Payload {
            meta: meta.into(),
            ends,
            data,
            segment,
        };
        payload.validate()?;
        Ok(payload)
    }

    /// The buffers a message carries these values in: item ends, then bytes (shared, not
    /// copied).
    pub fn wire_buffers(&self) -> Vec<Bytes> {
        vec![ends_to_bytes(&self.ends), self.data.clone()]
    }

    /// Bytes `start..end` of the data, to send on. From shared memory they are read from the
    /// file rather than through the mapping, so that this process does not hold the whole
    /// value resident by the time the last part goes.
    pub fn read_part(&self, start: u64, end: u64) -> std::io::Result<Bytes> {
        let Some(segment) = &self.segment else {
            return Ok(self.data.slice(start as usize..end as usize));
        };
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(segment.file.path())?;
        let mut part = vec![0; (end - start) as usize];
        file.read_exact_at(&mut part, segment.offset + start)?;
        Ok(Bytes::from(part))
    }

    /// Where these bytes are in shared memory on this host, if they are.
    pub fn region(&self) -> Option<Region> {
        self.segment.as_ref().map(|segment| Region {
            path: segment.file.path().to_string_lossy().into_owned(),
            offset: segment.offset,
            len: self.data.len() as u64,
        })
    }

    /// The buffers of a message that names this payload's region instead of carrying its
    /// bytes: the item ends alone.
    pub fn ends_buffer(&self) -> Vec<Bytes> {
        vec![ends_to_bytes(&self.ends)]
    }

    /// The buffers of a message for these values: the item ends alone when the bytes travel
    /// otherwise (the message names where they are, or they went ahead in parts), else both.
    pub fn buffers_unless(&self, bytes_elsewhere: bool) -> Vec<Bytes> {
        if bytes_elsewhere {
            self.ends_buffer()
        } else {
            self.wire_buffers()
        }
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
            segment: None,
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
