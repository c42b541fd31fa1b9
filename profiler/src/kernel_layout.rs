//! Where fields lie in the running kernel's structures, read from its BTF
//! (`/sys/kernel/btf/vmlinux`). The kernel programs follow a few pointers whose layout changes
//! between kernel versions and builds (a socket's network namespace); userspace finds the
//! offsets here and gives them to the programs as read-only globals before loading, which is
//! what CO-RE relocations would do for a C program.
//!
//! Only what that needs is parsed: the type section's records (to skip each kind correctly),
//! structs and unions with their members, and the modifiers and typedefs between them. aya
//! parses BTF too, but keeps its type lookups private; btf-rs is LGPL-2.1.
use std::{collections::HashMap, fs, io, path::Path};

/// BTF's magic number (`BTF_MAGIC`), little-endian.
const BTF_MAGIC: u16 = 0xeb9f;

// BTF kinds (`include/uapi/linux/btf.h`).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read the kernel's BTF `{path}`")]
    Read {
        path: String,
        #[source]
        cause: io::Error,
    },
    #[error("the kernel's BTF is malformed: {what}")]
    Malformed { what: &'static str },
    #[error("the kernel's BTF has no field `{path}`")]
    NoField { path: String },
}

/// One member of a struct or union.
#[derive(Debug, Clone)]
struct Member {
    /// Empty for an anonymous struct or union, whose members belong to the parent.
    name: String,
    type_id: u32,
    bit_offset: u32,
}

/// The kernel's structs and unions, with their members, and what every other type resolves
/// to (typedefs and modifiers are followed to what they name).
#[derive(Debug, Default)]
pub struct KernelLayout {
    /// Struct and union name -> their type ids (a name can be defined more than once).
    by_name: HashMap<String, Vec<u32>>,
    /// Struct or union type id -> its members.
    members: HashMap<u32, Vec<Member>>,
    /// Typedef or modifier type id -> the type it names.
    aliases: HashMap<u32, u32>,
}

impl KernelLayout {
    /// Reads the running kernel's BTF.
    pub fn of_running_kernel() -> Result<Self, LayoutError> {
        Self::read(Path::new(crate::kernel::VMLINUX_BTF))
    }

    pub fn read(path: &Path) -> Result<Self, LayoutError> {
        let data = fs::read(path).map_err(|cause| LayoutError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        Self::parse(&data)
    }

    /// Parses BTF bytes (little-endian, as the kernel's own).
    pub fn parse(data: &[u8]) -> Result<Self, LayoutError> {
        let malformed = |what| LayoutError::Malformed { what };
        let mut reader = Reader { data, offset: 0 };
        if reader.u16().ok_or(malformed("no header"))? != BTF_MAGIC {
            return Err(malformed("not BTF (bad magic)"));
        }
        reader.offset = 4;
        let header_bytes = reader.u32().ok_or(malformed("no header"))? as usize;
        let (type_offset, type_bytes) = (reader.u32(), reader.u32());
        let (string_offset, string_bytes) = (reader.u32(), reader.u32());
        let section = |offset: Option<u32>, bytes: Option<u32>| -> Option<&[u8]> {
            let start = header_bytes.checked_add(offset? as usize)?;
            data.get(start..start.checked_add(bytes? as usize)?)
        };
        let types = section(type_offset, type_bytes).ok_or(malformed("type section"))?;
        let strings = section(string_offset, string_bytes).ok_or(malformed("string section"))?;
        let string_at = |offset: u32| -> String {
            let bytes = strings.get(offset as usize..).unwrap_or_default();
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };

        let mut layout = Self::default();
        let mut reader = Reader {
            data: types,
            offset: 0,
        };
        let mut type_id = 0u32;
        while reader.offset < types.len() {
            type_id += 1;
            let name_offset = reader.u32().ok_or(malformed("type record"))?;
            let info = reader.u32().ok_or(malformed("type record"))?;
            let size_or_type = reader.u32().ok_or(malformed("type record"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let name = reader.u32().ok_or(malformed("member"))?;
                        let member_type = reader.u32().ok_or(malformed("member"))?;
                        let offset = reader.u32().ok_or(malformed("member"))?;
                        members.push(Member {
                            name: string_at(name),
                            type_id: member_type,
                            // With the kind flag, the top byte is a bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    let name = string_at(name_offset);
                    if !name.is_empty() {
                        layout.by_name.entry(name).or_default().push(type_id);
                    }
                    layout.members.insert(type_id, members);
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    layout.aliases.insert(type_id, size_or_type);
                }
                _ => {
                    let trailing = match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                        KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                        _ => 0,
                    };
                    reader.skip(trailing).ok_or(malformed("type record"))?;
                }
            }
        }
        Ok(layout)
    }

    /// The byte offset of `path` (`field`, or `field.inner.more`) in struct `structure`:
    /// members of anonymous structs and unions are found as the kernel's C code names them.
    pub fn offset_of(&self, structure: &str, path: &str) -> Result<u32, LayoutError> {
        let no_field = || LayoutError::NoField {
            path: format!("{structure}.{path}"),
        };
        // The one definition of that name with every field asked for.
        self.by_name
            .get(structure)
            .into_iter()
            .flatten()
            .find_map(|&type_id| self.path_offset(type_id, path))
            .map(|bits| bits / 8)
            .ok_or_else(no_field)
    }

    /// The bit offset of `path` in the struct or union `type_id`.
    fn path_offset(&self, type_id: u32, path: &str) -> Option<u32> {
        let (first, rest) = match path.split_once('.') {
            Some((first, rest)) => (first, Some(rest)),
            None => (path, None),
        };
        let (bits, member_type) = self.member(type_id, first, 0)?;
        match rest {
            None => Some(bits),
            Some(rest) => Some(bits + self.path_offset(self.resolve(member_type), rest)?),
        }
    }

    /// The bit offset and type of member `name` of `type_id`, looking into anonymous members.
    fn member(&self, type_id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let members = self.members.get(&self.resolve(type_id))?;
        if let Some(member) = members.iter().find(|member| member.name == name) {
            return Some((member.bit_offset, member.type_id));
        }
        members
            .iter()
            .filter(|member| member.name.is_empty())
            .find_map(|anonymous| {
                let (bits, found) = self.member(anonymous.type_id, name, depth + 1)?;
                Some((anonymous.bit_offset + bits, found))
            })
    }

    /// What `type_id` names once typedefs and modifiers are followed.
    fn resolve(&self, mut type_id: u32) -> u32 {
        for _ in 0..16 {
            match self.aliases.get(&type_id) {
                Some(&target) => type_id = target,
                None => break,
            }
        }
        type_id
    }
}

/// Little-endian reads that fail instead of running past the end.
struct Reader<'a> {
    data: &'a [u8],
    offset: usize,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let bytes = self.data.get(self.offset..self.offset.checked_add(N)?)?;
        self.offset += N;
        bytes.try_into().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn skip(&mut self, bytes: usize) -> Option<()> {
        let end = self.offset.checked_add(bytes)?;
        (end <= self.data.len()).then(|| self.offset = end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small BTF blob: `struct inner { int a; union { int b; int c; }; }` and
    /// `struct outer { long pad; const inner_t in; }` with `typedef struct inner inner_t`.
    fn fixture() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0c\0outer\0pad\0in\0inner_t\0";
        let at = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|window| window == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut record = |name: u32, info: u32, size: u32, trailing: &[u32]| {
            for word in [name, info, size].iter().chain(trailing) {
                types.extend(word.to_le_bytes());
            }
        };
        record(at("int"), KIND_INT << 24, 4, &[32]); // 1: int
        record(0, KIND_UNION << 24 | 2, 4, &[at("b"), 1, 0, at("c"), 1, 0]); // 2: union
        record(
            at("inner"),
            KIND_STRUCT << 24 | 2,
            8,
            &[at("a"), 1, 0, 0, 2, 32],
        ); // 3
        record(at("inner_t"), KIND_TYPEDEF << 24, 3, &[]); // 4: typedef
        record(0, KIND_CONST << 24, 4, &[]); // 5: const inner_t
        record(
            at("outer"),
            KIND_STRUCT << 24 | 2,
            16,
            &[at("pad"), 1, 0, at("in"), 5, 64],
        ); // 6
        let mut blob = Vec::new();
        blob.extend(BTF_MAGIC.to_le_bytes());
        blob.extend([1, 0]); // version, flags
        blob.extend(24u32.to_le_bytes()); // header length
        blob.extend(0u32.to_le_bytes());
        blob.extend((types.len() as u32).to_le_bytes());
        blob.extend((types.len() as u32).to_le_bytes());
        blob.extend((strings.len() as u32).to_le_bytes());
        blob.extend(&types);
        blob.extend(strings);
        blob
    }

    #[test]
    fn nested_anonymous_and_aliased_members_are_found() {
        let layout = KernelLayout::parse(&fixture()).unwrap();
        assert_eq!(layout.offset_of("inner", "a").unwrap(), 0);
        assert_eq!(layout.offset_of("inner", "c").unwrap(), 4);
        assert_eq!(layout.offset_of("outer", "in.b").unwrap(), 12);
        assert!(layout.offset_of("outer", "in.z").is_err());
        assert!(layout.offset_of("nothing", "a").is_err());
    }

    #[test]
    fn truncated_or_foreign_bytes_are_an_error_not_a_panic() {
        let blob = fixture();
        for length in 0..blob.len() {
            let _ = KernelLayout::parse(&blob[..length]);
        }
        assert!(KernelLayout::parse(b"\x7fELF and more bytes than a header").is_err());
    }

    #[test]
    fn the_running_kernel_places_a_socket_s_namespace() {
        let layout = KernelLayout::of_running_kernel().unwrap();
        let net = layout.offset_of("sock", "__sk_common.skc_net").unwrap();
        let inum = layout.offset_of("net", "ns.inum").unwrap();
        assert!(net > 0 && net < 256, "{net}");
        assert!(inum < 4096, "{inum}");
    }
}
